//! The machine's ceilings, measured in the same run as the kernels they judge: memory
//! bandwidth from a large multi-threaded copy, compute from a large f32 GEMM through kiln's
//! own kernel. A kernel's share of the ceiling is the time the roofline allows for its
//! FLOPs and bytes divided by the time it took.

use kiln_graph::cost::Cost;
use kiln_kernels::cpu::{gemm, sgemm512};
use rayon::prelude::*;
use std::time::Instant;

/// What to measure the ceilings with.
#[derive(Clone, Copy, Debug)]
pub struct CeilingOptions {
    /// Size of the copy's source (and of its destination), in MiB.
    pub copy_mib: usize,
    /// The GEMM is n x n x n.
    pub gemm_n: usize,
    /// Timed repetitions of each (the best is kept: a ceiling is what the machine can do).
    pub reps: usize,
}

impl Default for CeilingOptions {
    fn default() -> Self {
        CeilingOptions { copy_mib: 256, gemm_n: 2048, reps: 5 }
    }
}

/// Measured limits of this machine.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Ceilings {
    /// Bytes per second of the copy (bytes read plus bytes written, as the cost model counts).
    pub bandwidth: f64,
    /// FLOPs per second of the GEMM.
    pub flops: f64,
    /// How they were measured, for reports.
    pub copy_mib: usize,
    pub gemm_n: usize,
    /// The GEMM kernel that set the compute ceiling.
    pub gemm_kernel: &'static str,
    /// Threads in rayon's pool.
    pub threads: usize,
    /// The CPU's name (`model name` of /proc/cpuinfo where there is one).
    pub cpu: String,
    /// The 1-minute load average when measured (Linux), to judge how shared the machine was.
    pub load: Option<f64>,
}

impl Ceilings {
    /// Measures both ceilings on rayon's global pool.
    pub fn measure(o: &CeilingOptions) -> Ceilings {
        let reps = o.reps.max(1);
        let (bandwidth, flops, gemm_kernel) = (copy_bandwidth(o.copy_mib, reps), gemm_flops(o.gemm_n, reps), gemm_kernel_name());
        Ceilings {
            bandwidth,
            flops,
            copy_mib: o.copy_mib,
            gemm_n: o.gemm_n,
            gemm_kernel,
            threads: rayon::current_num_threads(),
            cpu: cpu_name(),
            load: load_average(),
        }
    }

    /// The higher of two measurements of each ceiling (say, before and after the kernels ran):
    /// on a shared machine the slower one was disturbed.
    pub fn best(self, other: Ceilings) -> Ceilings {
        let load = match (self.load, other.load) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        Ceilings { bandwidth: self.bandwidth.max(other.bandwidth), flops: self.flops.max(other.flops), load, ..self }
    }

    /// FLOPs per byte where the roofs meet: below it a kernel is bound by memory.
    pub fn ridge(&self) -> f64 {
        self.flops / self.bandwidth
    }

    /// The fastest the roofline allows for `c`, in seconds.
    pub fn floor_seconds(&self, c: Cost) -> f64 {
        (c.flops as f64 / self.flops).max(c.bytes as f64 / self.bandwidth)
    }

    /// FLOPs per second the roofline allows at `c`'s intensity.
    pub fn attainable(&self, c: Cost) -> f64 {
        self.flops.min(self.bandwidth * c.intensity())
    }

    /// Fraction of the roofline reached by doing `c` in `seconds` (achieved / attainable, in
    /// FLOPs or, for kernels without FLOPs, in bytes).
    pub fn share(&self, c: Cost, seconds: f64) -> f64 {
        if seconds <= 0.0 {
            return 0.0;
        }
        self.floor_seconds(c) / seconds
    }

    /// Which roof limits `c`.
    pub fn bound(&self, c: Cost) -> &'static str {
        if c.intensity() >= self.ridge() {
            "compute"
        } else {
            "memory"
        }
    }
}

impl Ceilings {
    /// The ceilings of a backend's device, measured through that backend (`Session::
    /// time_device`): bandwidth from an elementwise negation of `copy_mib` MiB of f32 (bytes
    /// read plus written), compute from a bf16 `gemm_n`^3 product (at least 8192 on a GPU);
    /// the best of `reps` runs each. `None` for a backend that computes in host memory.
    pub fn measure_device(backend: &str, o: &CeilingOptions) -> crate::Result<Option<Ceilings>> {
        use kiln_graph::{DType, Graph, UnaryOp};
        let be = kiln_runtime::by_name(backend)?;
        let reps = o.reps.max(1) + 1;
        let best = |g: Graph| -> crate::Result<Option<f64>> {
            let opts = crate::CompileOptions { profile: Default::default(), backend: be.name().to_string(), trace: false };
            let c = crate::compile_graph(&[("forward".to_string(), g)], "ceiling", "", &opts)?;
            let mut s = kiln_runtime::Session::new(c.program, std::sync::Arc::new(kiln_runtime::WeightStore::empty()))?;
            let e = s.program().entries[0].clone();
            let inputs = super::synthetic_inputs(&e);
            let refs: Vec<(&str, &kiln_runtime::Tensor)> = inputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
            Ok(s.time_device("forward", &refs, reps)?.map(|t| t.into_iter().fold(f64::INFINITY, f64::min)))
        };
        let n = (o.copy_mib.max(1) << 20) / 4;
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &[n]).map_err(|e| crate::Error::Usage(e.to_string()))?;
        let y = g.unary(UnaryOp::Neg, x).map_err(|e| crate::Error::Usage(e.to_string()))?;
        g.output("y", y);
        let Some(copy) = best(g)? else { return Ok(None) };
        let m = o.gemm_n.max(8192);
        let mut g = Graph::new();
        let a = g.input("a", DType::BF16, &[m, m]).map_err(|e| crate::Error::Usage(e.to_string()))?;
        let b = g.input("b", DType::BF16, &[m, m]).map_err(|e| crate::Error::Usage(e.to_string()))?;
        let c = g.matmul(a, b, true).map_err(|e| crate::Error::Usage(e.to_string()))?;
        g.output("c", c);
        let Some(gemm) = best(g)? else { return Ok(None) };
        Ok(Some(Ceilings {
            bandwidth: (2 * 4 * n) as f64 / copy,
            flops: (2 * m * m * m) as f64 / gemm,
            copy_mib: o.copy_mib,
            gemm_n: m,
            gemm_kernel: "the backend's bf16 GEMM (cuBLASLt on cuda)",
            threads: 0,
            cpu: format!("{backend} device"),
            load: None,
        }))
    }
}

/// Best bytes per second of a parallel `copy_from_slice` of `mib` MiB, counting the bytes
/// read and the bytes written.
fn copy_bandwidth(mib: usize, reps: usize) -> f64 {
    let n = (mib.max(1) << 20) / 4;
    let src: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let mut dst = vec![0f32; n];
    let chunk = n.div_ceil(8 * rayon::current_num_threads()).max(1024);
    let mut best = f64::INFINITY;
    for _ in 0..reps + 1 {
        // The first pass touches dst's pages; it is timed like the others but rarely wins.
        let t = Instant::now();
        dst.par_chunks_mut(chunk).zip(src.par_chunks(chunk)).for_each(|(d, s)| d.copy_from_slice(s));
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&dst);
    (2 * 4 * n) as f64 / best
}

fn gemm_kernel_name() -> &'static str {
    if sgemm512::available() {
        "kiln sgemm512 (packed weight, AVX-512)"
    } else {
        "kiln gemm (gemm crate)"
    }
}

/// Best FLOPs per second of an n x n x n f32 product through the kernel the cpu backend uses
/// for weight products (the packed AVX-512 kernel where the CPU has it).
fn gemm_flops(n: usize, reps: usize) -> f64 {
    let n = n.max(16);
    let a: Vec<f32> = (0..n * n).map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5).collect();
    let b: Vec<f32> = (0..n * n).map(|i| ((i * 104_729) % 1000) as f32 * 1e-3 - 0.5).collect();
    let mut c = vec![0f32; n * n];
    let packed = sgemm512::available().then(|| sgemm512::PackedB::pack(gemm::MatView::transposed(&b, n, n)));
    let mut best = f64::INFINITY;
    for _ in 0..reps + 1 {
        let t = Instant::now();
        match &packed {
            Some(p) => sgemm512::matmul_packed(&a, n, n, p, &mut c),
            None => gemm::matmul(gemm::MatView::row_major(&a, n, n), gemm::MatView::transposed(&b, n, n), &mut c),
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&c);
    (2 * n * n * n) as f64 / best
}

/// The 1-minute load average from /proc/loadavg.
fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg").ok()?.split_whitespace().next()?.parse().ok()
}

/// The CPU's marketing name, or the architecture when /proc/cpuinfo has none.
pub fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).map(|v| v.trim().to_string()))
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roof() -> Ceilings {
        Ceilings { bandwidth: 10e9, flops: 100e9, copy_mib: 1, gemm_n: 16, gemm_kernel: "test", threads: 1, cpu: "test".into(), load: None }
    }

    #[test]
    fn share_is_achieved_over_attainable() {
        let r = roof();
        assert_eq!(r.ridge(), 10.0);
        // 1 GB at intensity 1: memory bound, the roof allows 10 GFLOP/s; 0.2 s -> 50%.
        let c = Cost { flops: 1_000_000_000, bytes: 1_000_000_000 };
        assert_eq!(r.bound(c), "memory");
        assert_eq!(r.attainable(c), 10e9);
        assert!((r.share(c, 0.2) - 0.5).abs() < 1e-12);
        // 100 GFLOP on 1 GB: compute bound; 4 s -> 25%.
        let c = Cost { flops: 100_000_000_000, bytes: 1_000_000_000 };
        assert_eq!(r.bound(c), "compute");
        assert!((r.share(c, 4.0) - 0.25).abs() < 1e-12);
        // No FLOPs: judged by bytes alone.
        assert!((r.share(Cost { flops: 0, bytes: 10_000_000 }, 0.002) - 0.5).abs() < 1e-12);
    }
}
