//! A SentencePiece `tokenizer.model` read directly, against transformers' `GemmaTokenizer` on
//! the same file (fixtures from `scripts/gen_spm_fixtures.py`): ids and decoded text for every
//! line of a 1,200-line corpus, the `tokenizer.json` transformers writes for the same model,
//! the `<mask>` transformers appends when the model lacks it, `kiln generate --prompt` from a
//! folder holding only `tokenizer.model`, and the errors for bad files.

use kiln::tokenizer::TextTokenizer;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/spm")
}

fn cases() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("cases.json")).unwrap()).unwrap()
}

fn ids_of(v: &Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

/// A scratch folder, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("kiln-spm-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn every_line_matches_transformers() {
    let tok = TextTokenizer::open(&fixtures().join("model")).unwrap();
    assert!(tok.path().ends_with("tokenizer.model"));
    let meta = cases();
    assert_eq!(tok.vocab_size() as i64, meta["vocab"].as_i64().unwrap());
    assert_eq!((tok.id("<pad>").unwrap(), tok.id("<eos>").unwrap(), tok.id("<bos>").unwrap(), tok.id("<unk>").unwrap()), (0, 1, 2, 3));
    let lines = meta["cases"].as_array().unwrap();
    assert!(lines.len() >= 1000, "{} lines", lines.len());
    let (mut bad, mut bytes_used, mut special_used) = (Vec::new(), 0, 0);
    for c in lines {
        let text = c["text"].as_str().unwrap();
        let want = ids_of(&c["ids"]);
        let got = tok.encode(text).unwrap();
        if got != want {
            bad.push(format!("ids of {text:?}: kiln {got:?}, transformers {want:?}"));
        }
        // Absent decodes equal the line itself.
        for (key, skip) in [("decoded", false), ("decoded_skip", true)] {
            let want_text = c.get(key).and_then(Value::as_str).unwrap_or(text);
            let got_text = tok.decode(&want, skip).unwrap();
            if got_text != want_text {
                bad.push(format!("decode(skip={skip}) of {text:?}: kiln {got_text:?}, transformers {want_text:?}"));
            }
        }
        bytes_used += usize::from(want.iter().any(|&i| tok.decode(&[i], false).unwrap().contains('\u{FFFD}')));
        special_used += usize::from(want.iter().any(|&i| i <= 12));
    }
    assert!(bad.is_empty(), "{} of {} checks differ, first ones:\n{}", bad.len(), lines.len() * 3, bad[..bad.len().min(10)].join("\n"));
    // The corpus exercises byte fallback and the special and user-defined pieces.
    assert!(bytes_used > 50 && special_used > 50, "{bytes_used} lines with byte pieces, {special_used} with specials");
}

#[test]
fn tokenizer_json_and_tokenizer_model_agree() {
    let from_model = TextTokenizer::open(&fixtures().join("model")).unwrap();
    let from_json = TextTokenizer::open(&fixtures().join("json")).unwrap();
    assert!(from_json.path().ends_with("tokenizer.json"));
    assert_eq!(from_json.vocab_size(), from_model.vocab_size());
    for c in cases()["cases"].as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        let ids = from_model.encode(text).unwrap();
        assert_eq!(from_json.encode(text).unwrap(), ids, "{text:?}");
        assert_eq!(from_json.decode(&ids, true).unwrap(), from_model.decode(&ids, true).unwrap(), "{text:?}");
    }
    // With both files in a folder the JSON is read, as transformers does.
    let s = Scratch::new("both");
    std::fs::copy(fixtures().join("json/tokenizer.json"), s.0.join("tokenizer.json")).unwrap();
    std::fs::write(s.0.join("tokenizer.model"), b"not read").unwrap();
    assert!(TextTokenizer::open(&s.0).unwrap().path().ends_with("tokenizer.json"));
}

/// The first lines of the corpus through another model folder, against `meta[key]`.
fn check_variant(folder: &str, key: &str) {
    let tok = TextTokenizer::open(&fixtures().join(folder)).unwrap();
    let meta = cases();
    let want = meta[key].as_array().unwrap();
    assert!(want.len() >= 50);
    for (c, ids) in meta["cases"].as_array().unwrap().iter().zip(want) {
        let text = c["text"].as_str().unwrap();
        assert_eq!(tok.encode(text).unwrap(), ids_of(ids), "{folder}: {text:?}");
    }
}

#[test]
fn a_model_without_mask_gets_it_appended() {
    let tok = TextTokenizer::open(&fixtures().join("nomask")).unwrap();
    let meta = cases();
    assert_eq!(tok.vocab_size() as i64, meta["nomask_vocab"].as_i64().unwrap());
    assert_eq!(tok.id("<mask>").unwrap(), meta["nomask_mask_id"].as_i64().unwrap());
    check_variant("nomask", "nomask_ids");
}

/// UNUSED pieces stay ordinary pieces of the BPE vocabulary, as in transformers (SentencePiece
/// itself would never emit them).
#[test]
fn unused_pieces_are_kept_as_transformers_keeps_them() {
    let spm = kiln::tokenizer::spm::parse(&std::fs::read(fixtures().join("unused/tokenizer.model")).unwrap()).unwrap();
    let unused = spm.pieces.iter().filter(|p| p.kind == kiln::tokenizer::spm::PieceType::Unused).count();
    assert_eq!(unused, 5);
    check_variant("unused", "unused_ids");
}

/// `kiln generate --prompt` from the Gemma fixture model with its tokenizer.json swapped for the
/// SentencePiece model (a different vocabulary, so only the path is checked: the prompt's ids
/// are `<bos>` + the SentencePiece ids, and generation runs).
#[test]
fn generate_prompt_reads_tokenizer_model() {
    let s = Scratch::new("gen");
    let gemma = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/gemma");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(gemma.join(f), s.0.join(f)).unwrap();
    }
    std::fs::copy(fixtures().join("model/tokenizer.model"), s.0.join("tokenizer.model")).unwrap();
    let tok = TextTokenizer::open(&s.0).unwrap();
    let prompt = "hello wörld 日本語 🦀";
    let p = kiln::prompt::prepare(&s.0, &tok, prompt, None).unwrap();
    let mut want = vec![2];
    want.extend(tok.encode(prompt).unwrap());
    assert_eq!(p.input_ids, want);
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["generate", s.0.to_str().unwrap(), "--prompt", prompt, "--max-new-tokens", "3"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stats: Value = serde_json::from_str(stderr.lines().last().unwrap()).unwrap_or_else(|e| panic!("{e}: {stderr}"));
    assert_eq!(stats["new_ids"].as_array().unwrap().len(), 3, "{stderr}");
}

#[test]
fn bad_tokenizer_model_is_named() {
    let good = std::fs::read(fixtures().join("model/tokenizer.model")).unwrap();
    let s = Scratch::new("bad");
    let path = s.0.join("tokenizer.model");
    let open_err = |bytes: &[u8]| {
        std::fs::write(&path, bytes).unwrap();
        TextTokenizer::open(&s.0).err().map(|e| e.to_string()).unwrap_or_else(|| panic!("{} bytes opened", bytes.len()))
    };
    for cut in [3, 100, good.len() / 2, good.len() - 10] {
        let e = open_err(&good[..cut]);
        assert!(e.contains(path.to_str().unwrap()) && e.contains("not a valid SentencePiece tokenizer.model"), "cut {cut}: {e}");
    }
    let e = open_err(&good[..good.len() / 2]);
    assert!(e.contains("truncated file?"), "{e}");
    let e = open_err(b"{\"model\": {\"type\": \"BPE\"}}");
    assert!(e.contains("not a valid SentencePiece tokenizer.model") && e.contains("wire type"), "{e}");
    let e = open_err(b"");
    assert!(e.contains("holds no pieces"), "{e}");
    let png = kiln::png::encode(4, 4, 3, &[9; 48]).unwrap();
    let e = open_err(&png);
    assert!(e.contains("not a valid SentencePiece tokenizer.model"), "{e}");
    std::fs::remove_file(&path).unwrap();
    let e = TextTokenizer::open(&s.0).err().unwrap().to_string();
    assert!(e.contains("no tokenizer.json, tokenizer.model, paligemma_tokenizer.model or sentencepiece.model"), "{e}");
}

/// UNIGRAM models (T5's `c4_en` kind, and one with byte fallback, case folding, user-defined
/// pieces and whitespace kept) encode and decode as the `sentencepiece` library does, on every
/// line of a 1,115-line corpus (fixtures from `scripts/gen_spm_unigram_fixtures.py`).
#[test]
fn unigram_models_encode_and_decode_as_sentencepiece() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/spm_unigram");
    let cases: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    for name in ["t5like", "fallback"] {
        let c = &cases[name];
        // The folder is found by its file name (sentencepiece.model or tokenizer.model).
        let tok = TextTokenizer::open(&dir.join(name)).unwrap();
        assert!(tok.path().ends_with(c["file"].as_str().unwrap()));
        assert_eq!(tok.vocab_size() as u64, c["vocab_size"].as_u64().unwrap());
        let rows = c["rows"].as_array().unwrap();
        assert!(rows.len() >= 1000);
        let mut wrong = Vec::new();
        for r in rows {
            let text = r["text"].as_str().unwrap();
            let (got, want) = (tok.encode(text).unwrap(), ids_of(&r["ids"]));
            if got != want {
                wrong.push(format!("{text:?}: got {got:?}, sentencepiece {want:?}"));
                continue;
            }
            let decoded = tok.decode(&got, true).unwrap();
            if decoded != r["decoded"].as_str().unwrap() {
                wrong.push(format!("decode of {text:?}: got {decoded:?}, sentencepiece {:?}", r["decoded"]));
            }
        }
        for d in c["decodes"].as_array().unwrap() {
            let decoded = tok.decode(&ids_of(&d["ids"]), true).unwrap();
            if decoded != d["decoded"].as_str().unwrap() {
                wrong.push(format!("decode of {:?}: got {decoded:?}, sentencepiece {:?}", d["ids"], d["decoded"]));
            }
        }
        assert!(wrong.is_empty(), "{name}: {} of {} differ:\n{}", wrong.len(), rows.len(), wrong[..wrong.len().min(10)].join("\n"));
    }
    let tok = TextTokenizer::open(&dir.join("t5like")).unwrap();
    let e = tok.decode(&[800], true).unwrap_err().to_string();
    assert!(e.contains("token id 800 is past the 800 pieces"), "{e}");
}

/// The identity-rule UNIGRAM model of `scripts/gen_spm_fixtures.py` (dummy prefix and extra
/// whitespace removal on, as SentencePiece's defaults) gives back lowercase text it encodes.
#[test]
fn an_identity_unigram_model_round_trips() {
    let tok = TextTokenizer::open(&fixtures().join("unigram")).unwrap();
    let ids = tok.encode("  the quick   brown fox ").unwrap();
    assert!(!ids.is_empty());
    assert_eq!(tok.decode(&ids, true).unwrap(), "the quick brown fox");
}
