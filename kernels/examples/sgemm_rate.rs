//! The AVX-512 GEMM's rate per core, counted in CPU time rather than wall time, so that it
//! can be read on a shared, loaded machine: GFLOP per second of CPU time the process used.
//!
//! `cargo run --release -p kiln-kernels --example sgemm_rate [threads]`
//! Compare with `scripts/sgemm_rate_torch.py` (MKL, same shapes, same clock).

use kiln_kernels::cpu::gemm::MatView;
use kiln_kernels::cpu::sgemm512::{available, matmul_packed, PackedB};

fn cpu_seconds() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn main() {
    if !available() {
        eprintln!("this CPU has no AVX-512F: the packed GEMM does not run here");
        std::process::exit(1);
    }
    let threads: usize = std::env::args().nth(1).map(|s| s.parse().expect("threads: a number")).unwrap_or(1);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    // So400m/14 at 224 px, batch 1: 256 tokens; qkv, out, fc1, fc2; then Gemma 2 2B over
    // PaliGemma's 268-token prompt: q, gate/up, down.
    let shapes = [
        (256, 1152, 3456),
        (256, 1152, 1152),
        (256, 1152, 4304),
        (256, 4304, 1152),
        (1024, 1152, 4304),
        (268, 2304, 2048),
        (268, 2304, 9216),
        (268, 9216, 2304),
    ];
    println!("{:>6} {:>6} {:>6} {:>10} {:>14} {:>14}", "m", "k", "n", "reps", "GFLOP/cpu-s", "GFLOP/s wall");
    let mut total = (0.0, 0.0);
    for &(m, k, n) in &shapes {
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 104729) % 1000) as f32 * 1e-3 - 0.5).collect();
        let b = PackedB::pack(MatView::transposed(&w, k, n));
        let mut c = vec![0.0f32; m * n];
        let flops = 2.0 * (m * k * n) as f64;
        let reps = ((20e9 / flops) as usize).max(3);
        pool.install(|| matmul_packed(&a, m, k, &b, &mut c));
        let (t0, w0) = (cpu_seconds(), std::time::Instant::now());
        for _ in 0..reps {
            pool.install(|| matmul_packed(&a, m, k, &b, &mut c));
        }
        let (dt, wall) = (cpu_seconds() - t0, w0.elapsed().as_secs_f64());
        total.0 += flops * reps as f64;
        total.1 += dt;
        println!("{m:>6} {k:>6} {n:>6} {reps:>10} {:>14.1} {:>14.1}", flops * reps as f64 / dt * 1e-9, flops * reps as f64 / wall * 1e-9);
    }
    println!("all shapes: {:.1} GFLOP per CPU-second ({} threads)", total.0 / total.1 * 1e-9, threads);
}
