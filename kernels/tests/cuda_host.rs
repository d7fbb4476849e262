//! kiln's CUDA kernels run on the CPU (`kiln_kernels::cuda::host`): every module compiles with
//! the system C++ compiler, and real kernels on small inputs match plain Rust references.
//!
//! Needs a C++ compiler (`$CXX`, `g++` or `c++`). Without one the tests pass with a note,
//! unless `KILN_REQUIRE_CXX=1`, where a missing compiler is a failure.
#![cfg(feature = "cuda")]

use kiln_kernels::cuda::gemv::{self, GemvParams};
use kiln_kernels::cuda::host::{self, HostModule};
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
    let p =
        NormParams { x: addr(&xb), w: addr(&wb), b: 0, out: addr_mut(&mut outb), rows: rows as i32, d: d as i32, eps: 1e-6, add_one: 1 };
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

fn run_gemv(suffix: &str, (m, n, k): (usize, usize, usize), a: &[u128], b: &[u128], bias: Option<&[u128]>) -> Vec<u128> {
    let gemvm = HostModule::compile(&gemv::gemv_module().source).unwrap_or_else(|e| panic!("gemv: {e}"));
    let plan = gemv::plan(suffix, m, n, k).unwrap_or_else(|| panic!("no GEMV plan for {suffix} {m}x{n}x{k}"));
    assert!(plan.block > 32, "the shape should split K over warps (block {})", plan.block);
    let esize = if suffix == "f32" { 4 } else { 2 };
    let mut out = vec![0u128; (m * n * esize).div_ceil(16)];
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
    let out = run_gemv("f32", (m, n, k), &aligned(&a), &aligned(&b), None);
    assert_close(&bytemuck::cast_slice::<u128, f32>(&out)[..m * n], &gemv_ref(&a, &b, None, m, n, k), 1e-5, "gemv f32");

    let (m, n, k) = (2usize, 40usize, 1064usize);
    let (a, b, bias) = (bf16_bits(&values(m * k, 6)), bf16_bits(&values(n * k, 7)), bf16_bits(&values(n, 8)));
    let out = run_gemv("bf16", (m, n, k), &aligned(&a), &aligned(&b), Some(&aligned(&bias)));
    let want = gemv_ref(&from_bf16(&a), &from_bf16(&b), Some(&from_bf16(&bias)), m, n, k);
    assert_close(&from_bf16(&bytemuck::cast_slice::<u128, u16>(&out)[..m * n]), &want, 1.0 / 128.0, "gemv bf16");
}

/// Attention's shape: q [B, Sq, Hq, D], k and v [B, Sk, Hkv, D], causal from `q_offset`.
#[derive(Clone, Copy)]
struct Shape {
    b: usize,
    sq: usize,
    sk: usize,
    hq: usize,
    hkv: usize,
    d: usize,
    q_offset: usize,
}

/// softmax(q k^T * scale, causal) v in f64, out [B, Sq, Hq, D].
fn attention_ref(s: Shape, q: &[f32], k: &[f32], v: &[f32], scale: f32) -> Vec<f32> {
    let mut out = vec![0f32; s.b * s.sq * s.hq * s.d];
    for b in 0..s.b {
        for i in 0..s.sq {
            for h in 0..s.hq {
                let hk = h / (s.hq / s.hkv);
                let qr = &q[((b * s.sq + i) * s.hq + h) * s.d..][..s.d];
                let keys = (s.q_offset + i + 1).min(s.sk);
                let row = |j: usize| ((b * s.sk + j) * s.hkv + hk) * s.d;
                let scores: Vec<f64> = (0..keys)
                    .map(|j| qr.iter().zip(&k[row(j)..][..s.d]).map(|(&a, &c)| a as f64 * c as f64).sum::<f64>() * scale as f64)
                    .collect();
                let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|x| (x - mx).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..s.d {
                    let a: f64 = (0..keys).map(|j| e[j] * v[row(j) + c] as f64).sum();
                    out[((b * s.sq + i) * s.hq + h) * s.d + c] = (a / z) as f32;
                }
            }
        }
    }
    out
}

fn attn_params(s: Shape, splits: usize, scale: f32) -> AttnParams {
    AttnParams {
        batch: s.b as i32,
        sq: s.sq as i32,
        sk: s.sk as i32,
        hq: s.hq as i32,
        hkv: s.hkv as i32,
        d: s.d as i32,
        dv: s.d as i32,
        mask_kind: 1,
        q_offset: s.q_offset as i32,
        splits: splits as i32,
        scale,
        ..Default::default()
    }
}

/// Decode attention over a KV cache split in 2 along the keys: attn_rows_f32 then
/// attn_combine_f32, and attn_rows1_f32, whose last block per row merges (atomics on the
/// counters, which it leaves at zero).
#[test]
fn split_decode_attention_matches_the_reference() {
    if !cxx_or_skip() {
        return;
    }
    let att = module("attention");
    let s = Shape { b: 2, sq: 1, sk: 45, hq: 4, hkv: 2, d: 64, q_offset: 39 };
    let scale = 1.0 / (s.d as f32).sqrt();
    let q = values(s.b * s.sq * s.hq * s.d, 9);
    let k = values(s.b * s.sk * s.hkv * s.d, 10);
    let v = values(s.b * s.sk * s.hkv * s.d, 11);
    let want = attention_ref(s, &q, &k, &v, scale);
    let rows = s.b * s.sq * s.hq;
    let splits = 2;
    let grid = ((s.sq * s.hq) as u32, s.b as u32, splits as u32);
    let mut partial = vec![0f32; rows * splits * (s.d + 2)];
    let mut out = vec![0f32; rows * s.d];
    let mut p = attn_params(s, splits, scale);
    (p.q, p.k, p.v, p.out, p.partial) = (addr(&q), addr(&k), addr(&v), addr_mut(&mut out), addr_mut(&mut partial));
    launch(&att, "attn_rows_f32", grid, 128, 0, &p);
    launch(&att, "attn_combine_f32", (grid.0, grid.1, 1), 128, 0, &p);
    assert_close(&out, &want, 1e-5, "attn_rows_f32 + attn_combine_f32");

    let mut out1 = vec![0f32; rows * s.d];
    let mut counters = vec![0u32; rows];
    (p.out, p.counters) = (addr_mut(&mut out1), addr_mut(&mut counters));
    launch(&att, "attn_rows1_f32", grid, 128, 0, &p);
    assert_close(&out1, &want, 1e-5, "attn_rows1_f32");
    assert!(counters.iter().all(|&c| c == 0), "counters left at {counters:?}");

    // attn_rows_new_f32: key 39 (the last visible) comes from the new rows, which the launch
    // also stores into the caches (stale there before).
    let at = 39usize;
    let row_of = |b: usize, j: usize, h: usize| ((b * s.sk + j) * s.hkv + h) * s.d;
    let (mut kc, mut vc) = (k.clone(), v.clone());
    let (mut new_k, mut new_v) = (vec![0f32; s.b * s.hkv * s.d], vec![0f32; s.b * s.hkv * s.d]);
    for b in 0..s.b {
        for h in 0..s.hkv {
            let r = row_of(b, at, h);
            new_k[(b * s.hkv + h) * s.d..][..s.d].copy_from_slice(&k[r..r + s.d]);
            new_v[(b * s.hkv + h) * s.d..][..s.d].copy_from_slice(&v[r..r + s.d]);
            kc[r..r + s.d].fill(100.0);
            vc[r..r + s.d].fill(100.0);
        }
    }
    let (idx, mut err) = ([at as i64], [0i32]);
    let mut out2 = vec![0f32; rows * s.d];
    (p.k, p.v, p.out, p.new_k, p.new_v, p.at, p.at_i64, p.n, p.err) =
        (addr_mut(&mut kc), addr_mut(&mut vc), addr_mut(&mut out2), addr(&new_k), addr(&new_v), addr(&idx), 1, 1, addr_mut(&mut err));
    launch(&att, "attn_rows_new_f32", grid, 128, 0, &p);
    launch(&att, "attn_combine_f32", (grid.0, grid.1, 1), 128, 0, &p);
    assert_close(&out2, &want, 1e-5, "attn_rows_new_f32 + attn_combine_f32");
    assert_eq!((kc, vc, err[0]), (k, v, 0), "the new rows stored into the caches");
}

/// Runs prefill `kernel` of `m` (bf16 or f16 operands, as `f16` says) on random q, k, v of
/// shape `s` (causal) and checks it against the reference on the rounded operands.
fn check_prefill(m: &HostModule, kernel: &str, s: Shape, f16: bool, smem: usize) {
    let scale = 1.0 / (s.d as f32).sqrt();
    let half = |v: Vec<f32>| -> Vec<u16> {
        if f16 {
            v.iter().map(|&x| half::f16::from_f32(x).to_bits()).collect()
        } else {
            bf16_bits(&v)
        }
    };
    let back = |v: &[u16]| -> Vec<f32> {
        if f16 {
            v.iter().map(|&b| half::f16::from_bits(b).to_f32()).collect()
        } else {
            from_bf16(v)
        }
    };
    let q = half(values(s.b * s.sq * s.hq * s.d, 12));
    let k = half(values(s.b * s.sk * s.hkv * s.d, 13));
    let v = half(values(s.b * s.sk * s.hkv * s.d, 14));
    let want = attention_ref(s, &back(&q), &back(&k), &back(&v), scale);
    let (qa, ka, va) = (aligned(&q), aligned(&k), aligned(&v));
    let mut out = vec![0u128; (s.b * s.sq * s.hq * s.d * 2).div_ceil(16)];
    let mut p = attn_params(s, 1, scale);
    (p.q, p.k, p.v, p.out) = (addr(&qa), addr(&ka), addr(&va), addr_mut(&mut out));
    let bq = if kernel.contains("_q128") { 128 } else { kiln_kernels::cuda::MMA_BQ };
    let grid = (s.sq.div_ceil(bq) as u32, s.hq as u32, s.b as u32);
    launch(m, kernel, grid, 128, smem as u32, &p);
    let got = back(&bytemuck::cast_slice::<u128, u16>(&out)[..want.len()]);
    // P is rounded to the half type before P V; the output once more.
    assert_close(&got, &want, 1.0 / 64.0, kernel);
}

/// The tensor-core prefill (attn_mma_bf16_d64: ldmatrix, mma.sync, cp.async, dynamic shared
/// memory) over 70 causal query rows: two blocks of 64 rows, the second partly past Sq.
#[test]
fn tensor_core_prefill_matches_the_reference() {
    if !cxx_or_skip() {
        return;
    }
    let att = module("attention");
    let s = Shape { b: 1, sq: 70, sk: 70, hq: 2, hkv: 1, d: 64, q_offset: 0 };
    check_prefill(&att, "attn_mma_bf16_d64", s, false, kiln_kernels::cuda::mma_smem(64));
}

/// Every prefill variant of head dim 72 (attention_var_f16: f16 mma, the unpadded m16n8k8 tail
/// with ldmatrix x2, the cp.async ring, 128-row blocks, staged stores) over 130 causal rows
/// with grouped-query heads.
#[test]
fn every_head_dim_72_prefill_variant_matches_the_reference() {
    if !cxx_or_skip() {
        return;
    }
    let var = module("attention_var_f16");
    let s = Shape { b: 1, sq: 130, sk: 130, hq: 2, hkv: 1, d: 72, q_offset: 0 };
    for &(d, tag) in kiln_kernels::cuda::attn::ATTN_VARIANTS {
        let v = kiln_kernels::cuda::attn::AttnVariant::parse(tag).unwrap();
        check_prefill(&var, &v.kernel("f16", d), s, true, v.smem(d));
    }
}

fn sample(index: &HostModule, x: &[f32], rows: usize, temperature: f32, top_k: i64) -> Vec<i64> {
    let v = x.len() / rows;
    let opts = [temperature, 1.0f32];
    let ctr = [top_k, 0x1234, 0x5678, 3i64];
    let streams: Vec<i64> = (0..rows as i64).collect();
    let mut out = vec![-1i64; rows];
    let mut err = [0i32];
    let mut scratch = vec![0i32; rows * v];
    let p = SampleParams {
        x: addr(x),
        opts: addr(&opts),
        ctr: addr(&ctr),
        streams: addr(&streams),
        out: addr_mut(&mut out),
        err: addr_mut(&mut err),
        scratch: addr_mut(&mut scratch),
        rows: rows as i64,
        v: v as i64,
    };
    launch(index, "sample_token_f32", (rows as u32, 1, 1), 256, 0, &p);
    assert_eq!(err[0], 0, "sample_token_f32 set the error flag");
    out
}

/// sample_token_f32 over rows of 1000 logits: greedy is the first argmax (a block reduction
/// with a tie), top-k 1 the argmax through the radix select (shared-memory atomics), and
/// top-k 5 one of the 5 largest.
#[test]
fn sample_token_picks_what_the_options_allow() {
    if !cxx_or_skip() {
        return;
    }
    let index = module("index");
    let (rows, v) = (3usize, 1000usize);
    let mut x = values(rows * v, 15);
    for r in 0..rows {
        x[r * v + 100 + 300 * r] = 5.0;
        x[r * v + 700] = 5.0; // a tie after the first maximum
    }
    let argmax: Vec<i64> = (0..rows as i64).map(|r| 100 + 300 * r).collect();
    assert_eq!(sample(&index, &x, rows, 0.0, 0), argmax, "greedy");
    for r in 0..rows {
        x[r * v + 700] = 4.0;
    }
    assert_eq!(sample(&index, &x, rows, 1.0, 1), argmax, "top-k 1");
    let picks = sample(&index, &x, rows, 0.8, 5);
    for (r, &pick) in picks.iter().enumerate() {
        let row = &x[r * v..][..v];
        let above = row.iter().filter(|&&s| s > row[pick as usize]).count();
        assert!(above < 5, "row {r}: picked {pick}, {above} scores above it");
    }
    assert_eq!(sample(&index, &x, rows, 0.8, 5), picks, "the same counters draw the same tokens");
}

/// Host versions of `common.cuh`'s half conversions: from_f32<bf16> (cvt.rn.bf16.f32),
/// pack2<bf16> (cvt.rn.bf16x2.f32), from_f32<f16> and to_f32(f16), for a kernel compiled with
/// the host shim, against `half` over every f16 and a million f32 bit patterns (ties,
/// subnormals, infinities, NaN among them).
#[test]
fn half_conversions_round_as_the_gpu() {
    if !cxx_or_skip() {
        return;
    }
    let src = format!(
        "{}\n{}",
        kiln_kernels::cuda::COMMON,
        r#"struct CvtParams { i64 x, bf, pair, f16, h, hf, n; };
extern "C" __global__ void __launch_bounds__(256) cvt(const CvtParams p) {
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < p.n; i += (i64)gridDim.x * blockDim.x) {
    const float x = ((const float*)p.x)[i];
    ((bf16*)p.bf)[i] = from_f32<bf16>(x);
    ((unsigned*)p.pair)[i] = pack2<bf16>(x, -x);
    ((f16*)p.f16)[i] = from_f32<f16>(x);
    if (i < 65536) ((float*)p.hf)[i] = to_f32(((const f16*)p.h)[i]);
  }
}"#
    );
    let m = HostModule::compile(&src).unwrap_or_else(|e| panic!("{e}"));
    let mut bits: Vec<u32> = (0..1u32 << 20).map(|i| i.wrapping_mul(0x9e37_79b1) ^ (i >> 3)).collect();
    // Ties to even, subnormals, the largest finite values, infinities, NaN.
    bits.extend([
        0x3f80_8000,
        0x3f81_8000,
        0x0000_8000,
        0x0001_8000,
        0x8000_0001,
        0x7f7f_ffff,
        0x477f_f000,
        0x7f80_0000,
        0xff80_0000,
        0x7fc0_0001,
    ]);
    let x: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
    let n = x.len();
    let h: Vec<u16> = (0..=u16::MAX).collect();
    let (mut bf, mut pair, mut f16, mut hf) = (vec![0u16; n], vec![0u32; n], vec![0u16; n], vec![0f32; 65536]);
    let p = [addr(&x), addr_mut(&mut bf), addr_mut(&mut pair), addr_mut(&mut f16), addr(&h), addr_mut(&mut hf), n as u64];
    launch(&m, "cvt", (64, 1, 1), 256, 0, &p);
    for i in 0..n {
        let (want_bf, want_neg, want_f16) = (half::bf16::from_f32(x[i]), half::bf16::from_f32(-x[i]), half::f16::from_f32(x[i]));
        if x[i].is_nan() {
            // cvt.rn gives the canonical NaN.
            assert_eq!((bf[i], pair[i], f16[i]), (0x7fff, 0x7fff_7fff, 0x7fff), "NaN {:#x}", bits[i]);
            continue;
        }
        assert_eq!(bf[i], want_bf.to_bits(), "bf16 of {} ({:#x})", x[i], bits[i]);
        assert_eq!(pair[i], (want_neg.to_bits() as u32) << 16 | want_bf.to_bits() as u32, "bf16x2 of {}", x[i]);
        assert_eq!(f16[i], want_f16.to_bits(), "f16 of {} ({:#x})", x[i], bits[i]);
    }
    for (i, &g) in hf.iter().enumerate() {
        let want = half::f16::from_bits(i as u16).to_f32();
        assert!(g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()), "f16 {i:#x}: {g} vs {want}");
    }
}

/// A region in the shape `kiln-runtime`'s fused_codegen generates (common.cuh, `PARAMS_C`, a
/// grid-stride body over strided inputs, float and double math, the `_x2` entry that runs two
/// parameter blocks on `blockIdx.y`), against the same math in Rust.
#[test]
fn a_generated_style_fused_region_matches_the_reference() {
    if !cxx_or_skip() {
        return;
    }
    use kiln_kernels::cuda::fused::{FusedParams, PARAMS_C};
    let body = r#"
__device__ __forceinline__ void region_body(const FusedParams& p) {
  for (i64 x = blockIdx.x * (i64)blockDim.x + threadIdx.x; x < p.n; x += (i64)gridDim.x * blockDim.x) {
    i64 o0 = p.access[0] == 0 ? x : 0;
    i64 o1 = p.access[1] == 0 ? x : 0;
    if (p.strided) {
      i64 rem = x;
      for (int a = p.rank - 1; a >= 0; a--) {
        i64 ia = rem % p.dims[a];
        rem /= p.dims[a];
        if (p.access[1] == 2) o1 += ia * p.st[1][a];
      }
    }
    const float v0 = (float)to_f32(((const float*)p.ins[0])[o0]);
    const float v1 = (float)to_f32(((const bf16*)p.ins[1])[o1]);
    const float v2 = 0.5f * v0 * (1.0f + tanhf(0.7978845608f * (v0 + 0.044715f * v0 * v0 * v0)));
    const float v3 = to_f32(from_f32<bf16>(1.0f / (1.0f + expf(-v1))));
    const double v4 = log1p(fabs((double)v0)) + floor((double)v1 * 3.0) + fmin((double)v0, 0.5) + pow(fabs((double)v1), 1.5);
    const double v5 = trunc((double)v2 * 8.0) + sqrt(fmax((double)v3, 0.0)) + sin((double)v0) * cos((double)v1);
    ((float*)p.out)[x] = from_f32<float>((float)(fmaxf(v2 * v3, -0.25f) + (float)(v4 + v5)));
  }
}
extern "C" __global__ void __launch_bounds__(256) region(const FusedParams p) { pdl_enter(); region_body(p); }
struct FusedParams2 {
  FusedParams p[2];
};
extern "C" __global__ void __launch_bounds__(256) region_x2(const FusedParams2 p) { pdl_enter(); region_body(p.p[blockIdx.y]); }
"#;
    let m = HostModule::compile(&format!("{}{PARAMS_C}{body}", kiln_kernels::cuda::COMMON)).unwrap_or_else(|e| panic!("{e}"));
    let (r, d) = (5usize, 77usize);
    let x: Vec<f32> = values(r * d, 16).iter().map(|v| v * 3.0).collect();
    let y = bf16_bits(&values(d, 17));
    let bf = |v: f32| half::bf16::from_f32(v).to_f32();
    let want: Vec<f32> = (0..r * d)
        .map(|i| {
            let (v0, v1) = (x[i], bf(half::bf16::from_bits(y[i % d]).to_f32()));
            let v2 = 0.5 * v0 * (1.0 + (0.797_884_6 * (v0 + 0.044715 * v0 * v0 * v0)).tanh());
            let v3 = bf(1.0 / (1.0 + (-v1).exp()));
            let (d0, d1) = (v0 as f64, v1 as f64);
            let v4 = d0.abs().ln_1p() + (d1 * 3.0).floor() + d0.min(0.5) + d1.abs().powf(1.5);
            let v5 = (v2 as f64 * 8.0).trunc() + (v3 as f64).max(0.0).sqrt() + d0.sin() * d1.cos();
            (v2 * v3).max(-0.25) + (v4 + v5) as f32
        })
        .collect();
    let params = |out: &mut [f32]| {
        let mut p = FusedParams { out: addr_mut(out), n: (r * d) as i64, rank: 2, strided: 1, ..Default::default() };
        (p.ins[0], p.ins[1]) = (addr(&x), addr(&y));
        p.access[1] = 2;
        p.dims[..2].copy_from_slice(&[r as i64, d as i64]);
        p.st[1][..2].copy_from_slice(&[0, 1]);
        p
    };
    let mut out = vec![0f32; r * d];
    launch(&m, "region", (2, 1, 1), 256, 0, &params(&mut out));
    assert_close(&out, &want, 1e-5, "region");
    let (mut a, mut b) = (vec![0f32; r * d], vec![0f32; r * d]);
    launch(&m, "region_x2", (1, 2, 1), 128, 0, &[params(&mut a), params(&mut b)]);
    assert_close(&a, &want, 1e-5, "region_x2 block row 0");
    assert_close(&b, &want, 1e-5, "region_x2 block row 1");
}

/// The emulator's own rules: a thread that returned counts as arrived at `__syncthreads`,
/// `__shared__` memory is the block's (written by one thread, read by all after the barrier),
/// shuffles read the named lane, and waits that cannot be met are an error, not a hang.
#[test]
fn barriers_shared_memory_and_deadlocks() {
    if !cxx_or_skip() {
        return;
    }
    let src = format!(
        "{}\n{}",
        kiln_kernels::cuda::COMMON,
        r#"struct P { i64 out; };
extern "C" __global__ void rules(const P p) {
  __shared__ int s[64];
  if (threadIdx.x >= 40) return;  // exited threads count as arrived
  s[threadIdx.x] = (int)(blockIdx.x * 100 + threadIdx.x);
  __syncthreads();
  const int mirror = s[39 - threadIdx.x];
  const int lane = threadIdx.x & 31;
  const int from = threadIdx.x < 32 ? __shfl_sync(0xffffffffu, mirror, (lane + 1) & 31) : mirror;
  ((int*)p.out)[blockIdx.x * 40 + threadIdx.x] = from;
}
extern "C" __global__ void stuck(const P p) {
  if ((threadIdx.x & 31) == 0) __syncwarp();
  else __syncthreads();
}"#
    );
    let m = HostModule::compile(&src).unwrap_or_else(|e| panic!("{e}"));
    let mut out = vec![0i32; 2 * 40];
    let p = [addr_mut(&mut out)];
    launch(&m, "rules", (2, 1, 1), 64, 0, &p);
    for b in 0..2 {
        for t in 0..40 {
            let mirror = |t: usize| (b * 100 + 39 - t) as i32;
            let want = if t < 32 { mirror((t + 1) % 32) } else { mirror(t) };
            assert_eq!(out[b * 40 + t], want, "block {b} thread {t}");
        }
    }
    // SAFETY: `stuck` touches no memory.
    let err = unsafe { m.launch("stuck", (1, 1, 1), 64, 0, &bytes_of(&p)) }.unwrap_err();
    assert!(err.contains("deadlock"), "{err}");
    // SAFETY: no kernel runs.
    let err = unsafe { m.launch("missing", (1, 1, 1), 32, 0, &bytes_of(&p)) }.unwrap_err();
    assert!(err.contains("no kernel missing"), "{err}");
}

/// layer_norm_f32 and softmax_f32 (block sums and maxima) over 2 rows of 300.
#[test]
fn layer_norm_and_softmax_match_the_reference() {
    if !cxx_or_skip() {
        return;
    }
    let norm = module("norm");
    let (rows, d) = (2usize, 300usize);
    let x: Vec<f32> = values(rows * d, 18).iter().map(|v| v * 4.0 + 1.0).collect();
    let (w, b) = (values(d, 19), values(d, 20));
    let mut out = vec![0f32; rows * d];
    let p = NormParams { x: addr(&x), w: addr(&w), b: addr(&b), out: addr_mut(&mut out), rows: 2, d: d as i32, eps: 1e-5, add_one: 0 };
    launch(&norm, "layer_norm_f32", (rows as u32, 1, 1), 256, 0, &p);
    let mut want = Vec::new();
    for row in x.chunks(d) {
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
        let inv = 1.0 / (var + 1e-5).sqrt();
        want.extend((0..d).map(|c| ((row[c] as f64 - mean) * inv * w[c] as f64 + b[c] as f64) as f32));
    }
    assert_close(&out, &want, 1e-5, "layer_norm_f32");

    let mut out = vec![0f32; rows * d];
    let p = NormParams { x: addr(&x), w: 0, b: 0, out: addr_mut(&mut out), rows: 2, d: d as i32, eps: 0.0, add_one: 0 };
    launch(&norm, "softmax_f32", (rows as u32, 1, 1), 256, 0, &p);
    let mut want = Vec::new();
    for row in x.chunks(d) {
        let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let z: f64 = row.iter().map(|&v| (v as f64 - mx).exp()).sum();
        want.extend(row.iter().map(|&v| ((v as f64 - mx).exp() / z) as f32));
    }
    assert_close(&out, &want, 1e-5, "softmax_f32");
}
