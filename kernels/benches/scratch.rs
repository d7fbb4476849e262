use kiln_kernels::cpu::attention::*;
use kiln_kernels::cpu::elementwise::gelu_tanh;
use kiln_kernels::cpu::gemm::*;
use std::time::Instant;

/// Process CPU time (user + system, all threads) in seconds, from /proc/self/stat.
fn cpu_time() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap();
    let rest = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}

static CPU: std::sync::Mutex<Vec<f64>> = std::sync::Mutex::new(Vec::new());

/// Wall seconds per call; also records CPU seconds per call in CPU.
fn once<F: FnMut()>(f: &mut F, secs: f64) -> f64 {
    let c0 = cpu_time();
    let t = Instant::now();
    let mut it = 0;
    while t.elapsed().as_secs_f64() < secs {
        f();
        it += 1;
    }
    let w = t.elapsed().as_secs_f64() / it as f64;
    CPU.lock().unwrap().push((cpu_time() - c0) / it as f64);
    w
}

fn main() {
    let what = std::env::args().nth(1).unwrap_or_default();
    if what.is_empty() || what == "gemm" {
        let shapes = [(256, 1152, 1152), (256, 1152, 4304), (256, 4304, 1152), (256, 1152, 3456), (196, 768, 3072)];
        for &(m, k, n) in &shapes {
            let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
            let w: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.1).collect();
            let bias = vec![0.1f32; n];
            let mut c = vec![0f32; m * n];
            let flops = 2.0 * (m * k * n) as f64;
            let ep = |_: usize, p: &mut [f32]| {
                kiln_kernels::cpu::simd::vectorized(
                    #[inline(always)]
                    || {
                        for row in p.chunks_mut(n) {
                            for (x, &b) in row.iter_mut().zip(&bias) {
                                *x = gelu_tanh(*x + b);
                            }
                        }
                    },
                )
            };
            let b = if std::env::var("ROWMAJOR_B").is_ok() { MatView::row_major(&w, k, n) } else { MatView::transposed(&w, k, n) };
            let av = MatView::row_major(&a, m, k);
            let mut best = [f64::MAX; 4];
            let mut cpu = [f64::MAX; 4];
            for _ in 0..4 {
                CPU.lock().unwrap().clear();
                best[0] = best[0].min(once(&mut || matmul_with_epilogue_using(Strategy::RowPanels, av, b, &mut c, &|_, _| {}), 0.5));
                best[1] = best[1].min(once(&mut || matmul_with_epilogue_using(Strategy::RowPanels, av, b, &mut c, &ep), 0.5));
                best[2] = best[2].min(once(&mut || matmul_with_epilogue_using(Strategy::GemmParallel, av, b, &mut c, &|_, _| {}), 0.5));
                best[3] = best[3].min(once(&mut || matmul_with_epilogue_using(Strategy::GemmParallel, av, b, &mut c, &ep), 0.5));
                for (c, &v) in cpu.iter_mut().zip(CPU.lock().unwrap().iter()) {
                    *c = c.min(v);
                }
            }
            let g: Vec<String> =
                best.iter().zip(&cpu).map(|(t, c)| format!("{:.1} ({:.1}/cpu-s)", flops / t / 1e9, flops / c / 1e9)).collect();
            println!("{m}x{k}x{n}: panels {} panels+gelu {} | gemmpar {} gemmpar+gelu {}", g[0], g[1], g[2], g[3]);
        }
    }
    #[inline(always)]
    fn exp_nonpos_nofma(x: f32) -> f32 {
        const LO: f32 = -87.336_54;
        const LOG2E: f32 = std::f32::consts::LOG2_E;
        const LN2_HI: f32 = 0.693_359_4;
        const LN2_LO: f32 = -2.121_944_4e-4;
        const MAGIC: f32 = 12_582_912.0;
        let xc = if x < LO { LO } else { x };
        let t = xc * LOG2E + MAGIC;
        let nf = t - MAGIC;
        let n = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
        let r = xc - nf * LN2_HI - nf * LN2_LO;
        let mut p = 1.987_569_1e-4_f32;
        p = p * r + 1.398_2e-3;
        p = p * r + 8.333_452e-3;
        p = p * r + 4.166_579_6e-2;
        p = p * r + 1.666_666_5e-1;
        p = p * r + 0.5;
        let y = p * r * r + r + 1.0;
        let e = y * f32::from_bits(((n + 127) as u32) << 23);
        if x < LO {
            0.0
        } else {
            e
        }
    }
    if what == "exp" {
        use kiln_kernels::cpu::elementwise::{apply_unary, exp, exp_nonpos, gelu_tanh};
        use kiln_kernels::cpu::simd::vectorized;
        let n = 1 << 14;
        let x0: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 * -0.01).collect();
        let mut y = x0.clone();
        for _ in 0..2 {
            let t = once(&mut || apply_unary(exp, &x0, &mut y), 0.3);
            println!("exp apply_unary: {:.3} ns/elem", t / n as f64 * 1e9);
            let t = once(
                &mut || {
                    vectorized(
                        #[inline(always)]
                        || {
                            for (d, s) in y.chunks_exact_mut(32).zip(x0.chunks_exact(32)) {
                                for l in 0..32 {
                                    d[l] = exp(s[l]);
                                }
                            }
                        },
                    )
                },
                0.3,
            );
            println!("exp unrolled x4: {:.3} ns/elem", t / n as f64 * 1e9);
            let t = once(
                &mut || {
                    vectorized(
                        #[inline(always)]
                        || {
                            for (d, s) in y.chunks_exact_mut(32).zip(x0.chunks_exact(32)) {
                                for l in 0..32 {
                                    d[l] = exp_nonpos(s[l]);
                                }
                            }
                        },
                    )
                },
                0.3,
            );
            println!("exp_nonpos unrolled x4: {:.3} ns/elem", t / n as f64 * 1e9);
            let t = once(
                &mut || {
                    vectorized(
                        #[inline(always)]
                        || {
                            for (d, s) in y.iter_mut().zip(&x0) {
                                *d = exp_nonpos(*s);
                            }
                        },
                    )
                },
                0.3,
            );
            println!("exp_nonpos plain: {:.3} ns/elem", t / n as f64 * 1e9);
            let t = once(&mut || apply_unary(exp_nonpos_nofma, &x0, &mut y), 0.3);
            println!("exp_nonpos no fma: {:.3} ns/elem", t / n as f64 * 1e9);
            let t = once(&mut || apply_unary(gelu_tanh, &x0, &mut y), 0.3);
            println!("gelu_tanh: {:.3} ns/elem", t / n as f64 * 1e9);
            let t = once(
                &mut || {
                    vectorized(
                        #[inline(always)]
                        || {
                            for (d, s) in y.iter_mut().zip(&x0) {
                                *d = *s * 1.0001 + 0.5;
                            }
                        },
                    )
                },
                0.3,
            );
            println!("fma-ish: {:.3} ns/elem", t / n as f64 * 1e9);
        }
    }
    if what == "misc" {
        use kiln_kernels::cpu::movement::permute;
        for (shape, perm) in [(vec![1152usize, 4304usize], vec![1usize, 0usize]), (vec![4096, 16, 72], vec![1, 0, 2])] {
            let n: usize = shape.iter().product();
            let src: Vec<f32> = (0..n).map(|i| i as f32).collect();
            let mut dst = vec![0.0f32; n];
            let mut best = f64::MAX;
            for _ in 0..3 {
                best = best.min(once(&mut || permute(&src, &shape, &perm, &mut dst), 0.5));
            }
            println!("permute {shape:?} {perm:?}: {:.2} ms, {:.2} GB/s (read+write)", best * 1e3, 8.0 * n as f64 / best / 1e9);
        }
        let (rows, d) = (4096usize, 1152usize);
        let x: Vec<f32> = (0..rows * d).map(|i| (i % 101) as f32 * 0.01).collect();
        let g = vec![1.0f32; d];
        let mut o = vec![0.0f32; rows * d];
        let mut best = f64::MAX;
        for _ in 0..3 {
            best = best.min(once(&mut || kiln_kernels::cpu::norm::layer_norm(&x, rows, d, &g, Some(&g), 1e-6, &mut o), 0.5));
        }
        println!("layer_norm {rows}x{d}: {:.2} ms, {:.2} GB/s", best * 1e3, 8.0 * (rows * d) as f64 / best / 1e9);
        let mut best = f64::MAX;
        for _ in 0..3 {
            best = best.min(once(&mut || kiln_kernels::cpu::softmax::softmax(&x, rows, d, &mut o), 0.5));
        }
        println!("softmax {rows}x{d}: {:.2} ms, {:.2} ns/elem", best * 1e3, best / (rows * d) as f64 * 1e9);
    }
    if what.is_empty() || what == "attn" {
        for s in [256usize, 1024, 4096] {
            let sh = AttnShape { batch: 1, q_len: s, kv_len: s, q_heads: 16, kv_heads: 16, head_dim: 72, v_head_dim: 72 };
            let q: Vec<f32> = (0..s * 16 * 72).map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5).collect();
            let mut out = vec![0.0; q.len()];
            let flops = 4.0 * (16 * s * s * 72) as f64;
            let mut best = f64::MAX;
            CPU.lock().unwrap().clear();
            for _ in 0..(if s == 4096 { 2 } else { 5 }) {
                best = best.min(once(&mut || attention(&sh, &q, &q, &q, 1.0 / 72f32.sqrt(), None, AttnMask::None, &mut out), 1.0));
            }
            let cpu = CPU.lock().unwrap().iter().cloned().fold(f64::MAX, f64::min);
            println!(
                "attention S={s} H=16 D=72: {:.2} ms, {:.1} GFLOP/s wall, {:.1} GFLOP per CPU-second",
                best * 1e3,
                flops / best / 1e9,
                flops / cpu / 1e9
            );
        }
    }
}
