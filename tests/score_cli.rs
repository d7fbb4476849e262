//! `kiln score` against the references' logits: for a Gemma 2 fixture (transformers' logits of
//! a left-padded batch) and the CapPa captioner (big_vision's teacher-forced logits), the
//! log-softmax of the reference logits gathered at the given tokens, within 1e-4.

mod common;

use kiln::io;
use kiln_runtime::Tensor;
use std::path::{Path, PathBuf};

fn tensor(ts: &[(String, Tensor)], name: &str) -> Tensor {
    common::tensor(ts, name).clone()
}

/// `log_softmax(row)[tok]`, written out.
fn logprob(row: &[f32], tok: usize) -> f64 {
    let m = row.iter().fold(f64::MIN, |a, &x| a.max(x as f64));
    let z: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
    row[tok] as f64 - m - z.ln()
}

fn run_score(model: &Path, inputs: &[(String, Tensor)], tag: &str) -> Vec<(String, Tensor)> {
    let tmp = std::env::temp_dir().join(format!("kiln-score-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let (i, o) = (tmp.join("in.safetensors"), tmp.join("out.safetensors"));
    io::write(&i, inputs).unwrap();
    let r = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["score", model.to_str().unwrap(), "--inputs", i.to_str().unwrap(), "--out", o.to_str().unwrap()])
        .output()
        .unwrap();
    let got = io::read(&o);
    let _ = std::fs::remove_dir_all(&tmp);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    got.unwrap()
}

#[test]
fn a_causal_lm_scores_as_transformers_logits_say() {
    let dir: PathBuf = common::gemma_case("gemma2_gqa");
    let inputs = io::read(&dir.join("inputs.safetensors")).unwrap();
    let reference = io::read(&dir.join("reference.safetensors")).unwrap();
    let (ids, mask) = (tensor(&inputs, "input_ids"), tensor(&inputs, "attention_mask"));
    let (b, l) = (ids.ty.shape[0], ids.ty.shape[1]);
    let prompt = 5usize;
    let mut ins = vec![("input_ids".to_string(), ids.clone()), ("attention_mask".to_string(), mask.clone())];
    ins.push(("prompt_len".to_string(), Tensor::from_i64(&[1], &[prompt as i64])));
    let got = run_score(&dir, &ins, "gemma");
    let (lp, scores) = (tensor(&got, "logprobs").to_f32(), tensor(&got, "scores").to_f32());
    let logits = tensor(&reference, "logits").to_f32();
    let v = logits.len() / (b * l);
    let (ids, mask) = (ids.to_f64(), mask.to_f64());
    let mut scored = 0;
    for r in 0..b {
        let mut sum = 0.0;
        for t in 0..l {
            let real = t >= prompt && mask[r * l + t] == 1.0 && mask[r * l + t - 1] == 1.0;
            let want = if real { logprob(&logits[(r * l + t - 1) * v..][..v], ids[r * l + t] as usize) } else { 0.0 };
            assert!((lp[r * l + t] as f64 - want).abs() < 1e-4 * want.abs().max(1.0), "[{r}, {t}]: {} vs {want}", lp[r * l + t]);
            sum += want;
            scored += usize::from(real);
        }
        assert!((scores[r] as f64 - sum).abs() < 1e-4 * sum.abs().max(1.0), "row {r}: {} vs {sum}", scores[r]);
    }
    assert!(scored > 10, "only {scored} tokens were scored");
}

#[test]
fn an_encoder_decoder_scores_as_big_vision_logits_say() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/big_vision/cappa_captioner");
    let reference = io::read(&dir.join("reference.safetensors")).unwrap();
    let (images, text) = (tensor(&reference, "images"), tensor(&reference, "text"));
    let got = run_score(&dir, &[("images".to_string(), images), ("text".to_string(), text.clone())], "cappa");
    let (lp, scores) = (tensor(&got, "logprobs").to_f32(), tensor(&got, "scores").to_f32());
    let logits = tensor(&reference, "logits").to_f32();
    let (b, l) = (text.ty.shape[0], text.ty.shape[1]);
    let v = logits.len() / (b * l);
    let text = text.to_f64();
    for r in 0..b {
        let mut sum = 0.0;
        for t in 0..l {
            let tok = text[r * l + t] as usize;
            let want = if tok != 0 { logprob(&logits[(r * l + t) * v..][..v], tok) } else { 0.0 };
            assert!((lp[r * l + t] as f64 - want).abs() < 1e-4 * want.abs().max(1.0), "[{r}, {t}]: {} vs {want}", lp[r * l + t]);
            sum += want;
        }
        assert!((scores[r] as f64 - sum).abs() < 1e-4 * sum.abs().max(1.0), "row {r}");
    }
    // Row 1 ends in padding, which is not scored.
    assert!(text[2 * l - 1] == 0.0 && lp[2 * l - 1] == 0.0);
}
