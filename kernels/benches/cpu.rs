//! CPU kernel benchmarks: the SigLIP So400m / ViT-B GEMM shapes under both threading
//! strategies (each with a fused bias + GELU-tanh epilogue, as the runtime uses them),
//! flash attention at So400m's head shape, layer norm, softmax and an elementwise pass. Throughput is reported in FLOPs ("elements" in
//! criterion's output are floating-point operations: 2·m·k·n for a GEMM, 4·B·H·S²·D for
//! attention), so criterion prints GFLOP/s directly ("Gelem/s").
//!
//! Run with `cargo bench -p kiln-kernels --bench cpu`; the pool size follows
//! RAYON_NUM_THREADS (the dev box has 2 cores). Compare strategies within one run: the box is
//! shared, so absolute numbers drift between runs.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kiln_kernels::cpu::attention::{attention, AttnMask, AttnShape};
use kiln_kernels::cpu::elementwise::{apply_binary, gelu_tanh};
use kiln_kernels::cpu::gemm::{matmul_with_epilogue_using, MatView, Strategy};
use kiln_kernels::cpu::norm::layer_norm;
use kiln_kernels::cpu::simd::vectorized;
use kiln_kernels::cpu::softmax::softmax;

/// (m, k, n): So400m attention projections, MLP up, MLP down, fused QKV; ViT-B/16 MLP up.
const GEMM_SHAPES: [(usize, usize, usize); 5] =
    [(256, 1152, 1152), (256, 1152, 4304), (256, 4304, 1152), (256, 1152, 3456), (196, 768, 3072)];

/// Deterministic test data in [-0.5, 0.5).
fn data(n: usize, seed: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7919 + seed * 104_729) % 1000) as f32 * 1e-3 - 0.5).collect()
}

fn bench_gemm(c: &mut Criterion) {
    let mut g = c.benchmark_group("gemm_bias_gelu");
    g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    for &(m, k, n) in &GEMM_SHAPES {
        let a = data(m * k, 1);
        let w = data(n * k, 2); // PyTorch Linear layout [n, k], used transposed without a copy
        let bias = data(n, 3);
        let mut out = vec![0.0f32; m * n];
        let epilogue = |_: usize, panel: &mut [f32]| {
            vectorized(
                #[inline(always)]
                || {
                    for row in panel.chunks_exact_mut(n) {
                        for (x, &b) in row.iter_mut().zip(&bias) {
                            *x = gelu_tanh(*x + b);
                        }
                    }
                },
            )
        };
        g.throughput(Throughput::Elements((2 * m * k * n) as u64));
        for (name, strategy) in [("row_panels", Strategy::RowPanels), ("gemm_parallel", Strategy::GemmParallel)] {
            g.bench_function(BenchmarkId::new(name, format!("{m}x{k}x{n}")), |bch| {
                bch.iter(|| {
                    matmul_with_epilogue_using(strategy, MatView::row_major(&a, m, k), MatView::transposed(&w, k, n), &mut out, &epilogue)
                })
            });
        }
    }
    g.finish();
}

fn bench_attention(c: &mut Criterion) {
    let mut g = c.benchmark_group("attention");
    g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(3));
    for s in [256usize, 1024] {
        let sh = AttnShape { batch: 1, q_len: s, kv_len: s, q_heads: 16, kv_heads: 16, head_dim: 72, v_head_dim: 72 };
        let (q, k, v) = (data(s * 16 * 72, 4), data(s * 16 * 72, 5), data(s * 16 * 72, 6));
        let mut out = vec![0.0f32; q.len()];
        g.throughput(Throughput::Elements((4 * 16 * s * s * 72) as u64));
        g.bench_function(BenchmarkId::new("so400m_h16_d72", format!("S{s}")), |bch| {
            bch.iter(|| attention(&sh, &q, &k, &v, 1.0 / 72f32.sqrt(), None, AttnMask::None, &mut out))
        });
    }
    g.finish();
}

/// Layer norm over So400m's width and softmax over attention-score rows: memory-bound row
/// kernels, so throughput is reported in bytes (read once + written once).
fn bench_rows(c: &mut Criterion) {
    let mut g = c.benchmark_group("rows");
    g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    for (rows, d) in [(256usize, 1152usize), (4096, 1152)] {
        let (x, gamma, beta) = (data(rows * d, 7), data(d, 8), data(d, 9));
        let mut out = vec![0.0f32; rows * d];
        g.throughput(Throughput::Bytes((4 * (2 * rows * d + 2 * d)) as u64));
        g.bench_function(BenchmarkId::new("layer_norm", format!("{rows}x{d}")), |bch| {
            bch.iter(|| layer_norm(&x, rows, d, &gamma, Some(&beta), 1e-6, &mut out))
        });
    }
    for (rows, n) in [(16 * 256usize, 256usize), (16 * 1024, 1024)] {
        let x = data(rows * n, 10);
        let mut out = vec![0.0f32; rows * n];
        g.throughput(Throughput::Bytes((4 * 2 * rows * n) as u64));
        g.bench_function(BenchmarkId::new("softmax", format!("{rows}x{n}")), |bch| bch.iter(|| softmax(&x, rows, n, &mut out)));
    }
    g.finish();
}

/// An elementwise pass of the kind fusion leaves (residual add + GELU over an MLP activation),
/// through the kernels' parallel vectorised map. The runtime's fused-region evaluator itself
/// is benched in `benches/kernels.rs` (it lives in kiln-runtime).
fn bench_elementwise(c: &mut Criterion) {
    let mut g = c.benchmark_group("elementwise");
    g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    let n = 256 * 4304;
    let (a, b) = (data(n, 11), data(n, 12));
    let mut out = vec![0.0f32; n];
    g.throughput(Throughput::Bytes((4 * 3 * n) as u64));
    g.bench_function("gelu_tanh_of_sum_256x4304", |bch| bch.iter(|| apply_binary(|x, y| gelu_tanh(x + y), &a, &b, &mut out)));
    g.finish();
}

criterion_group!(benches, bench_gemm, bench_attention, bench_rows, bench_elementwise);
criterion_main!(benches);
