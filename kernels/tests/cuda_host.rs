//! kiln's CUDA kernels run on the CPU (`kiln_kernels::cuda::host`): every module compiles with
//! the system C++ compiler, and real kernels on small inputs match plain Rust references.
//!
//! Needs a C++ compiler (`$CXX`, `g++` or `c++`). Without one the tests pass with a note,
//! unless `KILN_REQUIRE_CXX=1`, where a missing compiler is a failure.
#![cfg(feature = "cuda")]

use kiln_kernels::cuda::host::{self, HostModule};
use kiln_kernels::cuda::gemv::{self, GemvParams};
use kiln_kernels::cuda::{modules, AttnParams, CopyParams, GatherParams, NormParams, SampleParams};

fn cxx_or_skip() -> bool {
    if host::available() {
        return true;
    }
    let required = std::env::var("KILN_REQUIRE_CXX").is_ok_and(|v| v == "1");
    assert!(!required, "KILN_REQUIRE_CXX=1 but no C++ compiler ($CXX, g++ or c++) was found");
    eprintln!("skipped: no C++ compiler ($CXX, g++ or c++)");
    false
}

#[test]
fn every_module_compiles_for_the_host_with_every_kernel() {
    if !cxx_or_skip() {
        return;
    }
    for m in modules() {
        let t = std::time::Instant::now();
        let hm = HostModule::compile(&m.source).unwrap_or_else(|e| panic!("{}: {e}", m.name));
        eprintln!("{}: {:?}", m.name, t.elapsed());
        for k in &m.kernels {
            assert!(hm.has(&k.name), "{}: no host entry {}", m.name, k.name);
        }
        assert!(!hm.has("no_such_kernel"));
    }
}

/// The host module of `modules()`' module `name`.
fn module(name: &str) -> HostModule {
    let m = modules().into_iter().find(|m| m.name == name).unwrap_or_else(|| panic!("no module {name}"));
    HostModule::compile(&m.source).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// A parameter struct's bytes, as the runtime passes them (`runtime/src/cuda/lower.rs` `bytes_of`).
fn bytes_of<T: Copy>(v: &T) -> Vec<u8> {
    // SAFETY: reads the size_of::<T>() bytes of a live, initialized `repr(C)` struct.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }.to_vec()
}

/// A buffer's address as a kernel parameter holds it.
fn addr<T>(v: &[T]) -> u64 {
    v.as_ptr() as u64
}

/// A written buffer's address.
fn addr_mut<T>(v: &mut [T]) -> u64 {
    v.as_mut_ptr() as u64
}

/// Deterministic values in [-1, 1) (a 64-bit LCG).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn bf16_bits(v: &[f32]) -> Vec<u16> {
    v.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect()
}

fn from_bf16(v: &[u16]) -> Vec<f32> {
    v.iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect()
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{what}[{i}]: {g} vs {w}");
    }
}

/// Launches `kernel` of `m` with `params`' bytes.
fn launch<P: Copy>(m: &HostModule, kernel: &str, grid: (u32, u32, u32), block: u32, smem: u32, params: &P) {
    // SAFETY: every test points the params' addresses at live buffers of the sizes the kernel
    // reads and writes.
    unsafe { m.launch(kernel, grid, block, smem, &bytes_of(params)) }.unwrap_or_else(|e| panic!("{kernel}: {e}"));
}

#[test]
fn copy_and_write_rows_move_the_elements_the_reference_moves() {
    if !cxx_or_skip() {
        return;
    }
    let data = module("data");
    // A transpose [3, 70] -> [70, 3] of 16-bit elements (210 elements: one block, one pass).
    let (r, c) = (3usize, 70usize);
    let src: Vec<u16> = (0..r * c).map(|i| (i * 7 + 1) as u16).collect();
    let mut dst = vec![0u16; r * c];
    let mut p = CopyParams { src: addr(&src), dst: addr_mut(&mut dst), n: (r * c) as i64, rank: 2, ..Default::default() };
    p.dims[..2].copy_from_slice(&[r as i64, c as i64]);
    p.src_st[..2].copy_from_slice(&[c as i64, 1]);
    p.dst_st[..2].copy_from_slice(&[1, r as i64]);
    launch(&data, "copy_b2", (1, 1, 1), 256, 0, &p);
    for i in 0..r {
        for j in 0..c {
            assert_eq!(dst[j * r + i], src[i * c + j], "({i}, {j})");
        }
    }
    // A grid-stride loop over 2 blocks of 64 threads: 1000 elements.
    let src: Vec<u32> = (0..1000).map(|i| i * 3).collect();
    let mut dst = vec![0u32; 1000];
    let mut p = CopyParams { src: addr(&src), dst: addr_mut(&mut dst), n: 1000, rank: 1, ..Default::default() };
    (p.dims[0], p.src_st[0], p.dst_st[0]) = (1000, 1, 1);
    launch(&data, "copy_b4", (2, 1, 1), 64, 0, &p);
    assert_eq!(dst, src);

    // write_rows: x [outer 2, nidx 2, inner 3] into out [2, len 5, 3] at idx[0].
    let (outer, len, nidx, inner) = (2usize, 5usize, 2usize, 3usize);
    let x: Vec<f32> = values(outer * nidx * inner, 1);
    for (at, fits) in [(2i64, true), (4, false)] {
        let mut out = vec![-7.0f32; outer * len * inner];
        let idx = [at];
        let mut err = [0i32];
        let p = GatherParams {
            x: addr(&x),
            idx: addr(&idx),
            out: addr_mut(&mut out),
            err: addr_mut(&mut err),
            outer: outer as i64,
            len: len as i64,
            nidx: nidx as i64,
            inner: inner as i64,
        };
        launch(&data, "write_rows_b4_i64", (1, 1, 1), 256, 0, &p);
        let mut want = vec![-7.0f32; outer * len * inner];
        if fits {
            for o in 0..outer {
                for j in 0..nidx {
                    for c in 0..inner {
                        want[(o * len + at as usize + j) * inner + c] = x[(o * nidx + j) * inner + c];
                    }
                }
            }
        }
        assert_eq!(out, want, "at {at}");
        assert_eq!(err[0], i32::from(!fits), "at {at}");
    }
}

/// RMS norm of each row of `x` [rows, d] in f64: x / sqrt(mean(x^2) + eps) * (add_one + w).
fn rms_norm_ref(x: &[f32], w: &[f32], d: usize, eps: f32, add_one: bool) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(d) {
        let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / d as f64;
        let inv = 1.0 / (ms + eps as f64).sqrt();
        let one = if add_one { 1.0 } else { 0.0 };
        out.extend(row.iter().zip(w).map(|(&v, &wc)| (v as f64 * inv * (one + wc as f64)) as f32));
    }
    out
}

/// The block reduction (barriers, warp shuffles) of rms_norm over 3 rows of 300 (more than a
/// block's 256 threads), in f32 and in bf16 with Gemma's (1 + w).
#[test]
fn rms_norm_matches_the_reference() {
    if !cxx_or_skip() {
        return;
    }
    let norm = module("norm");
    let (rows, d) = (3usize, 300usize);
    let x = values(rows * d, 2);
    let w = values(d, 3);
    let mut out = vec![0f32; rows * d];
    let p = NormParams { x: addr(&x), w: addr(&w), b: 0, out: addr_mut(&mut out), rows: rows as i32, d: d as i32, eps: 1e-6, add_one: 0 };
    launch(&norm, "rms_norm_f32", (rows as u32, 1, 1), 256, 0, &p);
    assert_close(&out, &rms_norm_ref(&x, &w, d, 1e-6, false), 1e-5, "rms_norm_f32");

    let (xb, wb) = (bf16_bits(&x), bf16_bits(&w));
    let mut outb = vec![0u16; rows * d];
    let p = NormParams { x: addr(&xb), w: addr(&wb), b: 0, out: addr_mut(&mut outb), rows: rows as i32, d: d as i32, eps: 1e-6, add_one: 1 };
    launch(&norm, "rms_norm_bf16", (rows as u32, 1, 1), 256, 0, &p);
    let want = rms_norm_ref(&from_bf16(&xb), &from_bf16(&wb), d, 1e-6, true);
    // One rounding to bf16 (8 bits of mantissa): within 2^-8 relative.
    assert_close(&from_bf16(&outb), &want, 1.0 / 256.0, "rms_norm_bf16");
}

/// out[m, n] = sum_k a[m, k] * b[n, k] (+ bias[n]) in f64.
fn gemv_ref(a: &[f32], b: &[f32], bias: Option<&[f32]>, m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let dot: f64 = (0..k).map(|c| a[i * k + c] as f64 * b[j * k + c] as f64).sum();
            out[i * n + j] = (dot + bias.map_or(0.0, |bv| bv[j] as f64)) as f32;
        }
    }
    out
}

/// 16-byte aligned storage of `n` elements of 4 or 2 bytes (the GEMV's rows are loaded as
/// 16-byte vectors).
fn aligned<T: bytemuck::Pod>(v: &[T]) -> Vec<u128> {
    let mut buf = vec![0u128; (std::mem::size_of_val(v)).div_ceil(16)];
    bytemuck::cast_slice_mut::<u128, u8>(&mut buf)[..std::mem::size_of_val(v)].copy_from_slice(bytemuck::cast_slice(v));
    buf
}

fn run_gemv(suffix: &str, m: usize, n: usize, k: usize, a: &[u128], b: &[u128], bias: Option<&[u128]>, out_bytes: usize) -> Vec<u128> {
    let gemvm = HostModule::compile(&gemv::gemv_module().source).unwrap_or_else(|e| panic!("gemv: {e}"));
    let plan = gemv::plan(suffix, m, n, k).unwrap_or_else(|| panic!("no GEMV plan for {suffix} {m}x{n}x{k}"));
    assert!(plan.block > 32, "the shape should split K over warps (block {})", plan.block);
    let mut out = vec![0u128; out_bytes.div_ceil(16)];
    let p = GemvParams {
        a: addr(a),
        b: addr(b),
        out: addr_mut(&mut out),
        bias: bias.map_or(0, addr),
        m: m as i32,
        n: n as i32,
        k: k as i32,
        flags: if bias.is_some() { 1 } else { 0 },
        kchunks: plan.kchunks,
        ..Default::default()
    };
    launch(&gemvm, &plan.kernel, (plan.grid, 1, 1), plan.block, 0, &p);
    out
}

/// The GEMVs as the runtime plans them: f32 on CUDA cores (warp shuffles, shared memory), and
/// bf16 on tensor cores (`mma.sync m16n8k16`, emulated as a warp collective) with a bias.
#[test]
fn gemv_matches_the_reference() {
    if !cxx_or_skip() {
        return;
    }
    let (m, n, k) = (3usize, 37usize, 1100usize);
    let (a, b) = (values(m * k, 4), values(n * k, 5));
    let out = run_gemv("f32", m, n, k, &aligned(&a), &aligned(&b), None, m * n * 4);
    assert_close(&bytemuck::cast_slice::<u128, f32>(&out)[..m * n], &gemv_ref(&a, &b, None, m, n, k), 1e-5, "gemv f32");

    let (m, n, k) = (2usize, 40usize, 1064usize);
    let (a, b, bias) = (bf16_bits(&values(m * k, 6)), bf16_bits(&values(n * k, 7)), bf16_bits(&values(n, 8)));
    let out = run_gemv("bf16", m, n, k, &aligned(&a), &aligned(&b), Some(&aligned(&bias)), m * n * 2);
    let want = gemv_ref(&from_bf16(&a), &from_bf16(&b), Some(&from_bf16(&bias)), m, n, k);
    assert_close(&from_bf16(&bytemuck::cast_slice::<u128, u16>(&out)[..m * n]), &want, 1.0 / 128.0, "gemv bf16");
}
