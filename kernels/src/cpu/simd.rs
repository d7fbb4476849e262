//! Run-time CPU-feature dispatch for hand-written loops.
//!
//! The workspace builds for the baseline x86-64 target (SSE2, no FMA), so plain loops
//! vectorise only 4 wide. [`vectorized`] runs a closure inside a function compiled with
//! AVX2+FMA when the CPU has them; the closure is inlined into it, so its loops get 8-wide
//! code. Floating-point results do not change: Rust never contracts `a * b + c` into an FMA.

/// Whether the running CPU has AVX2 and FMA (cached by std after the first call).
#[inline]
pub fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Runs `f`, compiled for AVX2+FMA when the CPU supports them.
///
/// Only code inlined into the AVX2 instantiation benefits, and LLVM will not inline a large
/// closure that has two call sites (this one and the fallback), so mark the closure
/// `#[inline(always)]` (allowed on stable for closures in argument position) and have its
/// loop call `#[inline(always)]` functions: `vectorized(#[inline(always)] || ...)`.
#[inline(always)]
pub fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            // SAFETY: run_avx2 only requires the avx2 and fma features, checked just above.
            return unsafe { run_avx2(f) };
        }
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn run_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Accumulator lanes for reductions: independent partial sums let the loop vectorise
/// (float addition is not associative, so LLVM will not split a single accumulator).
const LANES: usize = 16;

/// Sum of `xs`, accumulated in 16 independent lanes.
#[inline(always)]
pub fn sum(xs: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    acc.iter().sum::<f32>() + tail.iter().sum::<f32>()
}

/// Σ (x - c)², accumulated in 16 independent lanes.
#[inline(always)]
pub fn sum_sq_dev(xs: &[f32], c: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for ch in chunks {
        for l in 0..LANES {
            let d = ch[l] - c;
            acc[l] += d * d;
        }
    }
    acc.iter().sum::<f32>() + tail.iter().map(|&x| (x - c) * (x - c)).sum::<f32>()
}

/// Maximum of `xs` (-inf when empty); NaNs are skipped, like `f32::max`.
#[inline(always)]
pub fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] = acc[l].max(c[l]);
        }
    }
    let m = acc.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    tail.iter().fold(m, |m, &x| m.max(x))
}

/// Dot product of two equal-length slices in 16 independent lanes.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; LANES];
    let ca = a.chunks_exact(LANES);
    let cb = b.chunks_exact(LANES);
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reductions_match_sequential() {
        for n in [0usize, 1, 15, 16, 17, 100] {
            let xs: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let ys: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let s: f64 = xs.iter().map(|&x| f64::from(x)).sum();
            assert!((f64::from(vectorized(|| sum(&xs))) - s).abs() < 1e-5);
            let m = xs.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            assert_eq!(max(&xs), m);
            let d: f64 = xs.iter().zip(&ys).map(|(&x, &y)| f64::from(x) * f64::from(y)).sum();
            assert!((f64::from(dot(&xs, &ys)) - d).abs() < 1e-5);
            let v: f64 = xs.iter().map(|&x| (f64::from(x) - 0.25).powi(2)).sum();
            assert!((f64::from(sum_sq_dev(&xs, 0.25)) - v).abs() < 1e-5);
        }
    }
}
