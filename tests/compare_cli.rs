//! `kiln compare` is a gate: it exits 1 on NaN in either file, on a tensor missing from either
//! side, on a shape mismatch and on an error above `--tol`, and reads every dtype safetensors
//! carries (f64 and the integer types included). Runs the binary.

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::path::PathBuf;
use std::process::Command;

fn dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-compare-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Writes `tensors` (name, dtype, shape, little-endian bytes) to `name` in the test folder.
fn file(name: &str, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) -> PathBuf {
    let path = dir().join(name);
    let views: Vec<(String, TensorView)> =
        tensors.iter().map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
    path
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f64s(v: &[f64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Runs `kiln compare a b`; (exit code, stdout + stderr).
fn compare(a: &PathBuf, b: &PathBuf) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln")).arg("compare").arg(a).arg(b).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn equal_files_pass_in_every_dtype() {
    let ts = vec![
        ("a", Dtype::F32, vec![3], f32s(&[1.0, -2.0, 3.5])),
        ("b", Dtype::F64, vec![2], f64s(&[0.25, 1e300])),
        ("c", Dtype::I64, vec![2], [7i64, -1].iter().flat_map(|x| x.to_le_bytes()).collect()),
        ("d", Dtype::U16, vec![2], [7u16, 65535].iter().flat_map(|x| x.to_le_bytes()).collect()),
        ("e", Dtype::BF16, vec![1], half::bf16::from_f32(1.5).to_le_bytes().to_vec()),
        ("f", Dtype::BOOL, vec![2], vec![0, 1]),
    ];
    let (a, b) = (file("eq_a.safetensors", &ts), file("eq_b.safetensors", &ts));
    let (code, text) = compare(&a, &b);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("all 6 tensors within"), "{text}");
}

#[test]
fn nan_on_either_side_fails() {
    let good = file("nan_good.safetensors", &[("x", Dtype::F32, vec![2], f32s(&[1.0, 2.0]))]);
    let bad = file("nan_bad.safetensors", &[("x", Dtype::F32, vec![2], f32s(&[1.0, f32::NAN]))]);
    for (a, b) in [(&good, &bad), (&bad, &good), (&bad, &bad)] {
        let (code, text) = compare(a, b);
        assert_eq!(code, 1, "{text}");
        assert!(text.contains("NaN"), "{text}");
    }
}

#[test]
fn missing_tensors_and_shapes_fail() {
    let a = file("names_a.safetensors", &[("x", Dtype::F32, vec![2], f32s(&[1.0, 2.0]))]);
    let b = file("names_b.safetensors", &[("y", Dtype::F32, vec![2], f32s(&[1.0, 2.0]))]);
    let (code, text) = compare(&a, &b);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("x: missing from") && text.contains("y: missing from"), "{text}");

    let c = file("shape_c.safetensors", &[("x", Dtype::F32, vec![1, 2], f32s(&[1.0, 2.0]))]);
    let (code, text) = compare(&a, &c);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("shape"), "{text}");
}

#[test]
fn an_error_above_the_tolerance_fails_and_an_f64_tensor_is_read() {
    let a = file("tol_a.safetensors", &[("x", Dtype::F64, vec![2], f64s(&[1.0, 2.001]))]);
    let b = file("tol_b.safetensors", &[("x", Dtype::F32, vec![2], f32s(&[1.0, 2.0]))]);
    let (code, text) = compare(&a, &b);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("exceeds"), "{text}");
    assert!(text.contains("F64 vs F32"), "{text}");
}
