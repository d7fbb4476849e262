//! A table of bad inputs a user can give the CLI, each with the error they get (issue 20). Every
//! row must fail cleanly: exit status 1 with an `error: ...` line naming the fault (no panic, no
//! abort, no exit 0), no input file changed and no output (whole or half) left behind. The table
//! with each row's actual message is docs/bad-inputs.md, checked here so it cannot drift
//! (`KILN_BLESS=1 cargo test --test bad_inputs` rewrites it).

use kiln::io;
use kiln_runtime::Tensor;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn fixture(p: &str) -> PathBuf {
    root().join("tests/fixtures").join(p)
}

/// A scratch folder with the files the rows need, removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn kiln(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().unwrap()
}

fn compile(args: &[&str]) {
    let o = kiln(args);
    assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn scratch() -> Scratch {
    let d = std::env::temp_dir().join(format!("kiln-bad-inputs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let cappa = io::read(&fixture("big_vision/cappa_captioner/reference.safetensors")).unwrap();
    let t = |n: &str| cappa.iter().find(|(k, _)| k == n).unwrap().1.clone();
    io::write(&d.join("images.safetensors"), &[("images".into(), t("images"))]).unwrap();
    io::write(
        &d.join("bad_prompts.safetensors"),
        &[("images".into(), t("images")), ("prompts".into(), Tensor::from_i64(&[3, 2], &[0; 6]))],
    )
    .unwrap();
    io::write(&d.join("bad_eos.safetensors"), &[("images".into(), t("images")), ("eos_token".into(), Tensor::from_i64(&[2], &[1, 1]))])
        .unwrap();
    io::write(&d.join("nothing.safetensors"), &[("x".into(), Tensor::from_f32(&[1], &[0.0]))]).unwrap();
    std::fs::write(d.join("junk.safetensors"), b"not a safetensors file at all").unwrap();
    std::fs::write(d.join("x.png"), kiln::png::encode(4, 4, 3, &[9; 48]).unwrap()).unwrap();
    let jpg = std::fs::read(fixture("tokenizer/images/photo_61x45.jpg")).unwrap();
    std::fs::write(d.join("cut.jpg"), &jpg[..jpg.len() * 2 / 3]).unwrap();
    // kiln compare's operands.
    let x = |file: &str, name: &str, v: &[f32]| io::write(&d.join(file), &[(name.into(), Tensor::from_f32(&[2], v))]).unwrap();
    x("x.safetensors", "x", &[1.0, 2.0]);
    x("nan.safetensors", "x", &[1.0, f32::NAN]);
    x("y.safetensors", "y", &[1.0, 2.0]);
    io::write(&d.join("x3.safetensors"), &[("x".into(), Tensor::from_f32(&[3], &[1.0, 2.0, 3.0]))]).unwrap();
    let f64s: Vec<u8> = [1.0f64, 2.5].iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F64, vec![2], &f64s).unwrap();
    safetensors::serialize_to_file([("x", view)], None, &d.join("x64.safetensors")).unwrap();
    // ViT folders whose config gives width: null, and one with an unknown kwarg.
    let cfg = std::fs::read_to_string(fixture("big_vision/vit_map_learn/config.json")).unwrap();
    assert!(cfg.contains("\"width\": 48"), "the fixture's width");
    for (name, text) in [
        ("null_width", cfg.replace("\"width\": 48", "\"width\": null")),
        ("unknown_kwarg", cfg.replace("\"width\": 48", "\"width\": 48,\n  \"not_a_kwarg\": 3")),
    ] {
        let dst = d.join(name);
        std::fs::create_dir_all(&dst).unwrap();
        std::fs::copy(fixture("big_vision/vit_map_learn/params.npz"), dst.join("params.npz")).unwrap();
        std::fs::write(dst.join("config.json"), text).unwrap();
    }
    wide_posemb(&d.join("wide_posemb"));
    std::fs::create_dir_all(d.join("empty")).unwrap();
    artifacts(&d);
    Scratch(d)
}

/// The tiny ViT with its learned position table cut to 6 positions (no square grid).
fn wide_posemb(dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    std::fs::copy(fixture("big_vision/vit_map_learn/config.json"), dst.join("config.json")).unwrap();
    let bytes = std::fs::read(fixture("big_vision/vit_map_learn/params.npz")).unwrap();
    let idx = kiln_graph::npz::read_index(&bytes, true).unwrap();
    let mut arrays = Vec::new();
    for e in idx.in_file.iter().chain(&idx.in_buffer) {
        let src = if idx.in_file.contains(e) { &bytes[e.start..e.end] } else { &idx.inflated[e.start..e.end] };
        let mut v: Vec<f32> = src.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        let mut shape = e.ty.shape.to_vec();
        if e.name == "pos_embedding" {
            v.truncate(6 * shape[2]);
            shape[1] = 6;
        }
        arrays.push((e.name.clone(), shape, v));
    }
    kiln::npz_write::write(&dst.join("params.npz"), &arrays).unwrap();
}

/// Artifacts: the ViT's, one whose folder moved away (and which has no prepared file), one with a step missing an input, a
/// corrupt and a truncated copy, a Jet flow's and a Gemma generation program.
fn artifacts(d: &Path) {
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let vit = s(&fixture("big_vision/vit_map_learn"));
    compile(&["compile", &vit, "-o", &s(&d.join("vit.kiln"))]);
    copy_dir(&fixture("big_vision/vit_map_learn"), &d.join("gone"));
    // Without a prepared weight file: that one would carry the weights, folder or not.
    compile(&["compile", &s(&d.join("gone")), "--no-prepared", "-o", &s(&d.join("moved.kiln"))]);
    std::fs::remove_dir_all(d.join("gone")).unwrap();
    let mut p = kiln_graph::artifact::load_file(&d.join("vit.kiln")).unwrap();
    let step = p.entries[0].steps.iter_mut().find(|s| s.inputs.len() == 2).unwrap();
    step.inputs.pop();
    kiln_graph::artifact::save_file(&d.join("bad_steps.kiln"), &p).unwrap();
    let mut bytes = std::fs::read(d.join("vit.kiln")).unwrap();
    std::fs::write(d.join("trunc.kiln"), &bytes[..bytes.len() / 2]).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(d.join("corrupt.kiln"), &bytes).unwrap();
    compile(&["compile", &s(&fixture("jet")), "-o", &s(&d.join("jet.kiln"))]);
    let gemma = s(&fixture("gemma/gemma2_gqa"));
    let ins = io::read(&fixture("gemma/gemma2_gqa/inputs.safetensors")).unwrap();
    let ids = &ins.iter().find(|(n, _)| n == "input_ids").unwrap().1.ty.shape;
    let (b, l) = (ids[0].to_string(), ids[1].to_string());
    compile(&["compile", &gemma, "--generate", "--seq-len", &l, "--max-new-tokens", "3", "--batch", &b, "-o", &s(&d.join("gen.kiln"))]);
}

/// Every file under `dir` with a hash of its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, u64> {
    use std::hash::{Hash, Hasher};
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                std::fs::read(&p).unwrap().hash(&mut h);
                out.insert(p, h.finish());
            }
        }
    }
    out
}

/// One row: what the user gives, the command (`{name}` placeholders; `~` is a space inside an
/// argument) and a part of the error it must print.
type Row = (&'static str, &'static str, &'static str);

const ROWS: &[Row] = &[
    ("run: --out is the --inputs file", "run {vit} --inputs {images} --out {images}", "would be overwritten"),
    ("run: --out in a missing folder", "run {vit} --inputs {vit_in} --out {d}/no/such/dir/o.safetensors", "does not exist"),
    ("run: --out is a folder", "run {vit} --inputs {vit_in} --out {d}/empty", "is a folder"),
    ("run: no such model", "run {d}/missing --inputs {vit_in} --out {d}/o.safetensors", "config.json"),
    ("run: inputs missing", "run {vit} --inputs {d}/none.safetensors --out {d}/o.safetensors", "none.safetensors"),
    ("run: inputs not safetensors", "run {vit} --inputs {d}/junk.safetensors --out {d}/o.safetensors", "junk.safetensors"),
    ("run: unknown entry", "run {vit} --inputs {vit_in} --out {d}/o.safetensors --entry nope", "nope"),
    ("run: --dtype f64", "run {vit} --inputs {vit_in} --out {d}/o.safetensors --dtype f64", "expected f32 or bf16"),
    ("run: --batch 0", "run {vit} --inputs {vit_in} --out {d}/o.safetensors --batch 0", "--batch must be at least 1"),
    ("run: --device on cpu", "run {vit} --inputs {vit_in} --out {d}/o.safetensors --device cuda", "--device applies to --backend cube"),
    ("run: --cuda-gemv bogus", "run {vit} --inputs {vit_in} --out {d}/o.safetensors --cuda-gemv maybe", "expected auto, on or off"),
    (
        "run: --cuda-gemv on the cpu backend",
        "run {vit} --inputs {vit_in} --out {d}/o.safetensors --cuda-gemv on",
        "applies to the cuda backend",
    ),
    ("run: --cuda-fuse bogus", "run {vit} --inputs {vit_in} --out {d}/o.safetensors --cuda-fuse maybe", "expected on or off"),
    (
        "run: --cuda-fuse off on the cpu backend",
        "run {vit} --inputs {vit_in} --out {d}/o.safetensors --cuda-fuse off",
        "--cuda-fuse applies to the cuda backend",
    ),
    ("run: --cuda-pdl bogus", "run {vit} --inputs {vit_in} --out {d}/o.safetensors --cuda-pdl yes", "expected on or off"),
    (
        "run: --cuda-pdl on on the cpu backend",
        "run {vit} --inputs {vit_in} --out {d}/o.safetensors --cuda-pdl on",
        "--cuda-pdl applies to the cuda backend",
    ),
    ("run: width null", "run {d}/null_width --inputs {vit_in} --out {d}/o.safetensors", "null (Python None)"),
    ("run: unknown kwarg", "run {d}/unknown_kwarg --inputs {vit_in} --out {d}/o.safetensors", "not_a_kwarg"),
    ("run: an artifact on inputs of another shape", "run {d}/vit.kiln --inputs {images} --out {d}/o.safetensors", "input 'images'"),
    (
        "run: a batch that needs more memory than the machine has",
        "run {vit} --inputs {vit_in} --out {d}/o.safetensors --batch 1000000000",
        "out of memory",
    ),
    (
        "run: --batch 2^60 (the arena size overflows)",
        "run {vit} --inputs {vit_in} --out {d}/o.safetensors --batch 1152921504606846976",
        "larger than kiln compiles",
    ),
    (
        "run: --resolution 100000 on a sincos ViT",
        "run {sincos} --inputs {vit_in} --out {d}/o.safetensors --resolution 100000",
        "larger than kiln builds as a constant",
    ),
    ("run: an artifact whose folder moved", "run {d}/moved.kiln --inputs {vit_in} --out {d}/o.safetensors", "pass --weights"),
    (
        "run: an artifact with --batch",
        "run {d}/vit.kiln --inputs {vit_in} --out {d}/o.safetensors --batch 2",
        "--batch applies to a model folder",
    ),
    (
        "run: an artifact with --resolution",
        "run {d}/vit.kiln --inputs {vit_in} --out {d}/o.safetensors --resolution 32",
        "--resolution applies",
    ),
    ("run: an artifact with --dtype", "run {d}/vit.kiln --inputs {vit_in} --out {d}/o.safetensors --dtype bf16", "--dtype applies"),
    (
        "run: an artifact with another --backend",
        "run {d}/vit.kiln --inputs {vit_in} --out {d}/o.safetensors --backend cube",
        "--backend applies",
    ),
    (
        "run: an artifact whose steps are inconsistent",
        "run {d}/bad_steps.kiln --inputs {vit_in} --out {d}/o.safetensors",
        "invalid program",
    ),
    ("run: an artifact with a corrupt body", "run {d}/corrupt.kiln --inputs {vit_in} --out {d}/o.safetensors", "checksum mismatch"),
    ("run: a truncated artifact", "run {d}/trunc.kiln --inputs {vit_in} --out {d}/o.safetensors", "truncated"),
    ("run: a file that is not an artifact", "run {d}/junk.safetensors --inputs {vit_in} --out {d}/o.safetensors", "not a kiln artifact"),
    ("run: --weights that do not exist", "run {d}/vit.kiln --weights {d}/nowhere --inputs {vit_in} --out {d}/o.safetensors", "nowhere"),
    ("inspect: a folder without config.json", "inspect {d}/empty", "no config.json"),
    ("inspect: an artifact with --ir", "inspect {d}/vit.kiln --ir", "--ir shows the passes"),
    ("inspect: a resolution the position table does not fit", "inspect {vit} --resolution 16x24", "--resolution HxW"),
    ("bench: an artifact with --batch", "bench {d}/vit.kiln --batch 4", "--batch applies"),
    ("compile: an unknown backend", "compile {vit} --backend tpu -o {d}/a.kiln", "unknown backend"),
    ("compile: -o an existing folder", "compile {vit} -o {d}/empty", "is a folder"),
    ("compile: a non-square size the checkpoint's grid does not fit", "compile {vit} --resolution 8x24 -o {d}/a.kiln", "holds 9 positions"),
    ("compile: a position table that is not square, at the default size", "compile {d}/wide_posemb -o {d}/a.kiln", "--resolution HxW"),
    (
        "compile: --generate on an image model",
        "compile {vit} --generate --seq-len 8 --max-new-tokens 3 -o {d}/a.kiln",
        "does not generate text",
    ),
    ("sample: NaN temperature", "sample {jet} --temperature NaN -o {d}/s.png", "finite"),
    ("sample: infinite temperature", "sample {jet} --temperature inf -o {d}/s.png", "finite"),
    ("sample: --count 0", "sample {jet} --count 0 -o {d}/s.png", "--count must be at least 1"),
    ("sample: -o in a missing folder", "sample {jet} -o {d}/no/dir/s.png", "does not exist"),
    (
        "sample: more images than the artifact's batch",
        "sample {d}/jet.kiln --count 3 -o {d}/s.png",
        "--count 3: the artifact was compiled for 1",
    ),
    ("generate: --out is the --inputs file", "generate {cappa} --inputs {images} --out {images}", "would be overwritten"),
    ("generate: --device with cpu", "generate {gemma} --inputs {gemma_in} --out {d}/g.safetensors --device wgpu", "--device applies"),
    (
        "generate: a bogus cube device",
        "generate {gemma} --inputs {gemma_in} --out {d}/g.safetensors --backend cube --device tpu",
        "expected wgpu or cuda",
    ),
    ("generate: --cuda-pdl bogus", "generate {gemma} --inputs {gemma_in} --out {d}/g.safetensors --cuda-pdl yes", "expected on or off"),
    (
        "generate: --cuda-fuse off on the cpu backend",
        "generate {gemma} --inputs {gemma_in} --out {d}/g.safetensors --cuda-fuse off",
        "--cuda-fuse applies to the cuda backend",
    ),
    (
        "generate: --cuda-gemv on an encoder-decoder",
        "generate {cappa} --inputs {images} --out {d}/g.safetensors --cuda-gemv on",
        "apply to Gemma and PaliGemma generation",
    ),
    ("generate: top-p 0", "generate {gemma} --inputs {gemma_in} --out {d}/g.safetensors --temperature 1 --top-p 0", "top_p"),
    ("generate: negative temperature", "generate {gemma} --inputs {gemma_in} --out {d}/g.safetensors --temperature=-1", "temperature"),
    (
        "generate: top-k and top-p on an encoder-decoder",
        "generate {cappa} --inputs {images} --out {d}/g.safetensors --max-new-tokens 4 --temperature 1 --top-k 2 --top-p 0.5",
        "together",
    ),
    (
        "generate: more steps than the decoder has",
        "generate {cappa} --inputs {images} --out {d}/g.safetensors --max-new-tokens 99",
        "positions",
    ),
    ("generate: prompts of another batch", "generate {cappa} --inputs {d}/bad_prompts.safetensors --out {d}/g.safetensors", "prompts"),
    ("generate: two eos tokens", "generate {cappa} --inputs {d}/bad_eos.safetensors --out {d}/g.safetensors", "eos_token"),
    ("generate: --image without --prompt on a non-UViM folder", "generate {vit} --image {d}/x.png -o {d}/o.png", "uvim.json"),
    ("generate: --draw into a missing folder", "generate {gemma} --prompt hi --image {d}/x.png --draw {d}/no/dir/d.png", "does not exist"),
    ("generate: a truncated JPEG", "generate {pg} --prompt caption~en --image {d}/cut.jpg", "image file is truncated"),
    ("generate: an image that is not an image", "generate {pg} --prompt caption~en --image {d}/junk.safetensors", "cannot decode image"),
    (
        "generate: an artifact that is not a generation program",
        "generate {d}/vit.kiln --inputs {gemma_in} --out {d}/g.safetensors",
        "not a generation program",
    ),
    (
        "generate: a generation artifact with --bucket",
        "generate {d}/gen.kiln --inputs {gemma_in} --out {d}/g.safetensors --bucket 9",
        "--bucket applies",
    ),
    (
        "generate: more new tokens than the artifact's cache",
        "generate {d}/gen.kiln --inputs {gemma_in} --out {d}/g.safetensors --max-new-tokens 9",
        "do not fit the cache",
    ),
    ("score: --out is the --inputs file", "score {gemma} --inputs {images} --out {images}", "would be overwritten"),
    ("score: nothing to score", "score {vit} --inputs {vit_in} --out {d}/sc.safetensors", "no input_ids"),
    ("synth: an unknown model", "synth siglip-xxl -o {d}/syn", "unknown synth model"),
    ("compare: a missing file", "compare {d}/none.safetensors {images}", "none.safetensors"),
    ("compare: NaN in the first file", "compare {d}/nan.safetensors {d}/x.safetensors", "NaN"),
    ("compare: NaN in the second file", "compare {d}/x.safetensors {d}/nan.safetensors", "NaN"),
    ("compare: no tensor names in common", "compare {d}/x.safetensors {d}/y.safetensors", "missing"),
    ("compare: a shape mismatch", "compare {d}/x.safetensors {d}/x3.safetensors", "shape"),
    ("compare: an f64 tensor that differs", "compare {d}/x.safetensors {d}/x64.safetensors", "relative error"),
];

/// The error line as the docs show it: the scratch folder and the repository made relative,
/// and what differs between machines, checkouts, builds and runs left out (free memory,
/// checksums and sizes of artifacts that record absolute paths, the build's backends).
fn for_docs(line: &str, d: &str) -> String {
    let mut s = line.replace(d, "$TMP").replace(&root().join("tests/fixtures").display().to_string(), "fixtures");
    if let Some(i) = s.find(" more than this machine has available") {
        s.truncate(i);
        s.push_str(" more than this machine has available (...)");
    }
    // The backends this build has (the cuda feature or not).
    if let Some(i) = s.find("(available in this build: ") {
        s.truncate(i);
        s.push_str("(available in this build: ...)");
    }
    // Artifact sizes: an artifact records its source folder's absolute path.
    if let Some(i) = s.find(": truncated: expected ") {
        s.truncate(i);
        s.push_str(": truncated: expected ... bytes, found ...");
    }
    // Checksums of artifacts that record the scratch path.
    let words: Vec<String> = s
        .split(' ')
        .map(|w| {
            let hex = w.trim_matches(|c: char| !c.is_ascii_hexdigit());
            if hex.len() == 16 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
                w.replace(hex, "...")
            } else {
                w.to_string()
            }
        })
        .collect();
    words.join(" ").replace('|', "\\|")
}

#[test]
fn every_bad_input_fails_cleanly() {
    let s = scratch();
    let d = s.0.to_str().unwrap().to_string();
    let f = |p: &str| fixture(p).to_str().unwrap().to_string();
    let vars = [
        ("{d}", d.clone()),
        ("{vit_in}", f("big_vision/vit_map_learn/reference.safetensors")),
        ("{vit}", f("big_vision/vit_map_learn")),
        ("{sincos}", f("big_vision/vit_tok_sincos2d")),
        ("{cappa}", f("big_vision/cappa_captioner")),
        ("{gemma_in}", f("gemma/gemma2_gqa/inputs.safetensors")),
        ("{gemma}", f("gemma/gemma2_gqa")),
        ("{jet}", f("jet")),
        ("{pg}", f("tokenizer/paligemma")),
        ("{images}", format!("{d}/images.safetensors")),
    ];
    let mut doc = String::from(DOC_HEAD);
    let mut failed = Vec::new();
    for (i, (name, cmd, want)) in ROWS.iter().enumerate() {
        let args: Vec<String> =
            cmd.split_whitespace().map(|a| vars.iter().fold(a.to_string(), |a, (k, v)| a.replace(k, v)).replace('~', " ")).collect();
        let before = snapshot(&s.0);
        let r = std::process::Command::new(env!("CARGO_BIN_EXE_kiln")).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&r.stderr);
        let line = err.lines().find(|l| l.starts_with("error: ")).unwrap_or_default();
        let after = snapshot(&s.0);
        let fault = if r.status.code() != Some(1) {
            format!("exit {:?}", r.status.code())
        } else if err.contains("panicked") || line.is_empty() {
            "no error line, or a panic".into()
        } else if !line.contains(want) {
            format!("no '{want}' in the error")
        } else if before != after {
            "a file in the scratch folder was written, changed or removed".into()
        } else {
            doc.push_str(&format!("| {} | {name} | `kiln {}` | {} |\n", i + 1, for_docs(&args.join(" "), &d), for_docs(line, &d)));
            continue;
        };
        failed.push(format!("{name}: {fault}; stderr: {err}"));
    }
    assert!(failed.is_empty(), "{} rows failed:\n{}", failed.len(), failed.join("\n"));
    assert!(ROWS.len() >= 50, "{} rows", ROWS.len());
    let path = root().join("docs/bad-inputs.md");
    if std::env::var_os("KILN_BLESS").is_some() {
        std::fs::write(&path, &doc).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(committed == doc, "docs/bad-inputs.md is stale: rerun with KILN_BLESS=1 and commit it");
}

const DOC_HEAD: &str = "# Bad inputs and the errors kiln gives

Generated by `tests/bad_inputs.rs`, which runs every row in CI and fails when this file differs
(`KILN_BLESS=1 cargo test --test bad_inputs` rewrites it). Each row exits with status 1 and the
`error:` line shown, leaves every input file as it was and writes no output, whole or half.
`$TMP` is the test's scratch folder (its files are made by the test), `fixtures` is
`tests/fixtures`; where a message holds the machine's free memory, a file's checksum or size
(artifacts record absolute paths) or the build's list of backends, `(...)` and `...` stand for
them.

| # | input | command | error |
|---|-------|---------|-------|
";
