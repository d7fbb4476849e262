//! `kiln rank`: leave-one-out kNN accuracy against the NumPy reference of
//! `scripts/gen_ensemble_fixtures.py` (on an engineered set full of exact ties, and on the
//! embeddings the shipped fixture models give of the generated labelled folder), the ranking
//! end to end (re-embedding, order, failures reported), and bad folders.

mod common;

use kiln::rank::{knn_predict, rank, scan, RankOptions};
use kiln::CompileOptions;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ensemble").join(name)
}

fn json(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name)).unwrap()).unwrap()
}

/// `embeddings [N, D]` and `labels [N]` of a file.
fn embeddings(path: &Path) -> (Vec<f32>, usize, Vec<usize>) {
    let ts = kiln::io::read(path).unwrap();
    let e = common::tensor(&ts, "embeddings");
    let labels = common::tensor(&ts, "labels").to_f64().iter().map(|&x| x as usize).collect();
    (e.to_f32(), e.ty.shape[1], labels)
}

fn as_usizes(v: &Value) -> Vec<usize> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect()
}

/// The models the script's `kiln rank` call embedded, in its order (`<index>.safetensors`).
fn fixture_models() -> Vec<PathBuf> {
    vec![common::big_vision_case("vit_map_learn"), common::big_vision_case("vit_tok_sincos2d"), common::siglip_case("vision_map")]
}

fn options(k: usize) -> RankOptions {
    let compile = CompileOptions { profile: Default::default(), backend: "cpu".into(), trace: false };
    RankOptions { k, output: None, batch: 4, compile, progress: false, save_embeddings: None }
}

#[test]
fn knn_matches_numpy_on_exact_ties() {
    let (emb, d, labels) = embeddings(&fixture("ties.safetensors"));
    let want = &json("expected.json")["ties"];
    for k in 1..=5 {
        let got = knn_predict(&emb, d, &labels, k).unwrap();
        assert_eq!(got, as_usizes(&want[k.to_string()]), "k={k}");
    }
    // The set does exercise the vote tie rule: at k=2 some example's two neighbours disagree.
    let two = knn_predict(&emb, d, &labels, 2).unwrap();
    let one = knn_predict(&emb, d, &labels, 1).unwrap();
    assert_eq!(two, one, "k=2 ties go to the nearest neighbour's class, so k=2 equals k=1");
}

#[test]
fn knn_matches_numpy_on_fixture_model_embeddings() {
    let want = json("knn_expected.json");
    let files = want.as_object().unwrap();
    assert_eq!(files.len(), fixture_models().len());
    for (file, per_k) in files {
        let (emb, d, labels) = embeddings(&fixture(&format!("embeddings/{file}")));
        for k in 1..=5 {
            let got = knn_predict(&emb, d, &labels, k).unwrap();
            let w = &per_k[k.to_string()];
            assert_eq!(got, as_usizes(&w["predictions"]), "{file} k={k}");
            assert_eq!(got.iter().zip(&labels).filter(|(a, b)| a == b).count() as u64, w["correct"].as_u64().unwrap());
        }
    }
}

/// Ranking the fixture models re-embeds the folder as the committed embeddings say (the image
/// decoding, preprocessing, batching with a padded last batch), gives NumPy's accuracies,
/// sorts them, and reports a model without an embedding output instead of dropping it.
#[test]
fn rank_reembeds_sorts_and_reports_failures() {
    let mut models = fixture_models();
    models.insert(1, common::siglip_case("vision_nohead"));
    let r = rank(&models, &fixture("data"), &options(3)).unwrap();
    assert_eq!((r.images, r.classes), (15, 3));
    assert_eq!(r.failed.len(), 1);
    assert_eq!(r.failed[0].0, models[1]);
    assert!(r.failed[0].1.contains("no output pooler_output or pre_logits"), "{}", r.failed[0].1);
    let want = json("knn_expected.json");
    assert_eq!(r.ranked.len(), 3);
    for (i, m) in fixture_models().iter().enumerate() {
        let got = r.ranked.iter().find(|x| &x.model == m).unwrap();
        let (emb, d, _) = embeddings(&fixture(&format!("embeddings/{i}.safetensors")));
        assert_eq!(got.emb.dim, d);
        let err = common::rel_err(&got.emb.values, &emb);
        assert!(err < 1e-4, "{}: embeddings differ from the committed ones by {err:e}", m.display());
        assert_eq!(got.correct as u64, want[format!("{i}.safetensors")]["3"]["correct"].as_u64().unwrap(), "{}", m.display());
    }
    assert!(r.ranked.windows(2).all(|w| w[0].accuracy >= w[1].accuracy), "not sorted");
    assert!(r.ranked[0].accuracy > r.ranked[2].accuracy, "the fixture should separate the models");
}

/// The binary: JSON, sorted, failures in `failed` and on stderr, no progress bar drawn when
/// stderr is not a terminal.
#[test]
fn cli_json_lists_failures_and_stays_quiet_off_a_terminal() {
    let models = [common::siglip_case("vision_nohead"), common::siglip_case("vision_map")];
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("rank")
        .args(&models)
        .args(["--data", fixture("data").to_str().unwrap(), "--k", "5", "--batch", "4", "--json"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ranked"].as_array().unwrap().len(), 1);
    assert_eq!(v["failed"][0]["model"].as_str().unwrap(), models[0].display().to_string());
    let want = json("knn_expected.json")["2.safetensors"]["5"]["correct"].as_u64().unwrap();
    assert_eq!(v["ranked"][0]["correct"].as_u64().unwrap(), want);
    assert!(v["tie_rule"].as_str().unwrap().contains("nearest neighbour wins"));
    assert_eq!(stderr.lines().count(), 1, "only the skipped model, no progress: {stderr}");
    assert!(stderr.contains("skipping") && stderr.contains("vision_nohead"), "{stderr}");
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("kiln-rank-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    /// A folder per class with `n` 8x8 PNGs each.
    fn with_classes(name: &str, classes: &[(&str, usize)]) -> Self {
        let t = TempDir::new(name);
        for (c, n) in classes {
            std::fs::create_dir_all(t.0.join(c)).unwrap();
            for i in 0..*n {
                kiln::png::write(&t.0.join(c).join(format!("{i}.png")), 8, 8, 3, &[(i * 40) as u8; 192]).unwrap();
            }
        }
        t
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn bad_folders_and_k_get_clear_errors() {
    let err = |p: &Path| scan(p).unwrap_err().to_string();
    let empty = TempDir::new("empty");
    assert!(err(&empty.0).contains("no class subfolders"), "{}", err(&empty.0));
    let one = TempDir::with_classes("one-image", &[("cats", 3), ("dogs", 1)]);
    assert!(err(&one.0).contains("class 'dogs' has one image"), "{}", err(&one.0));
    let none = TempDir::with_classes("no-image", &[("cats", 3), ("dogs", 0)]);
    assert!(err(&none.0).contains("class 'dogs' has no images"), "{}", err(&none.0));
    let single = TempDir::with_classes("one-class", &[("cats", 3)]);
    assert!(err(&single.0).contains("needs at least two"), "{}", err(&single.0));
    assert!(err(&empty.0.join("missing")).contains("not a folder"));
    // Non-images beside the images are counted and left out.
    let ok = TempDir::with_classes("ok", &[("a", 2), ("b", 2)]);
    std::fs::write(ok.0.join("a/notes.txt"), "x").unwrap();
    let ds = scan(&ok.0).unwrap();
    assert_eq!((ds.images.len(), ds.skipped, ds.classes.clone()), (4, 1, vec!["a".to_string(), "b".to_string()]));
    // k must leave a neighbour out: 4 images allow k up to 3.
    let msg = rank(&[common::siglip_case("vision_map")], &ok.0, &options(4)).unwrap_err().to_string();
    assert!(msg.contains("--k 4: expected 1 to 3"), "{msg}");
    let msg = knn_predict(&[1.0, f32::NAN, 0.0, 1.0], 2, &[0, 1], 1).unwrap_err().to_string();
    assert!(msg.contains("example 0 holds NaN"), "{msg}");
}

/// `--output` picks another output as the embedding; one that is not `[batch, width]` is a
/// failure of that model, named.
#[test]
fn output_overrides_the_embedding() {
    let models = [common::big_vision_case("vit_map_learn"), common::siglip_case("vision_nohead")];
    let mut o = options(3);
    o.output = Some("head_input".into());
    let r = rank(&models, &fixture("data"), &o).unwrap();
    assert_eq!(r.ranked.len(), 1);
    assert_eq!((r.ranked[0].emb.output.as_str(), r.ranked[0].emb.dim), ("head_input", 48));
    assert!(r.failed[0].1.contains("no output 'head_input'"), "{}", r.failed[0].1);
    o.output = Some("last_hidden_state".into());
    let r = rank(&models[1..], &fixture("data"), &o).unwrap();
    assert!(r.failed[0].1.contains("expected [batch, width] embeddings"), "{}", r.failed[0].1);
}
