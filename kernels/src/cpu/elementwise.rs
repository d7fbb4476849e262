//! Scalar f32 activation functions for fused elementwise regions and GEMM epilogues.
//!
//! Everything on the hot path is branch-free (`if` on values lowers to selects) and
//! `#[inline(always)]`, so a loop over a slice calling these vectorises, 8 wide inside
//! [`crate::cpu::simd::vectorized`]. [`exp`] is a polynomial approximation (≤ 2 ulp), not
//! libm's, because libm calls do not vectorise and dominate softmax and GELU otherwise.

use rayon::prelude::*;

use super::simd::vectorized;

/// Elements per parallel task in the slice helpers: big enough to amortise rayon's overhead.
const CHUNK: usize = 1 << 14;

/// e^x in f32 to about 2 ulp; 0 below the normal range (x < -87.34), +inf above 88.72, NaN
/// propagates. Cody–Waite range reduction plus the Cephes degree-6 polynomial.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LO: f32 = -87.336_54; // ln(f32::MIN_POSITIVE)
    const HI: f32 = 88.722_83; // ln(f32::MAX)
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n * LN2_HI is exact for |n| < 2^9.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to an integer and leaves it in the low mantissa bits; this
    // vectorises on SSE2, unlike `round`.
    const MAGIC: f32 = 12_582_912.0;
    let xc = x.clamp(LO, HI); // NaN stays NaN
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
    // n is in [-126, 128]; 2^128 is not a normal f32, so split it as 2^127 * 2.
    let extra = if n > 127 { 2.0 } else { 1.0 };
    let scale = f32::from_bits(((n.min(127) + 127) as u32) << 23);
    let e = y * scale * extra;
    if x < LO {
        0.0
    } else if x > HI {
        f32::INFINITY
    } else {
        e
    }
}

/// e^x for x ≤ 0 (softmax arguments after subtracting the row max), ≤ 2 ulp; 0 below
/// -87.34 (so -inf gives 0), NaN propagates. Skips [`exp`]'s overflow handling and uses
/// fused multiply-adds: ~20% cheaper inside [`crate::cpu::simd::vectorized`], where FMA is
/// an instruction. Outside it `mul_add` is a libm call, so only use this in such loops.
#[inline(always)]
pub fn exp_nonpos(x: f32) -> f32 {
    const LO: f32 = -87.336_54;
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const MAGIC: f32 = 12_582_912.0;
    let xc = if x < LO { LO } else { x }; // NaN stays NaN
    let t = xc.mul_add(LOG2E, MAGIC);
    let nf = t - MAGIC;
    let n = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let r = nf.mul_add(-LN2_LO, nf.mul_add(-LN2_HI, xc));
    let mut p = 1.987_569_1e-4_f32;
    p = p.mul_add(r, 1.398_2e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5);
    let y = p.mul_add(r * r, r) + 1.0;
    // n ≥ -126 after the clamp, so the exponent field stays normal.
    let e = y * f32::from_bits(((n + 127) as u32) << 23);
    if x < LO {
        0.0
    } else {
        e
    }
}

/// tanh for attention soft-capping: 1 - 2/(e^{2x}+1) with an odd Taylor polynomial near 0
/// where that form cancels; absolute error below 3e-7.
#[inline(always)]
pub fn tanh_fast(x: f32) -> f32 {
    let a = if x < 0.0 { -x } else { x };
    let e = exp(2.0 * a);
    let big = 1.0 - 2.0 / (e + 1.0);
    let a2 = a * a;
    let small = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0))));
    let t = if a < 0.125 { small } else { big };
    if x < 0.0 {
        -t
    } else {
        t
    }
}

/// Logistic sigmoid 1/(1+e^-x).
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// SiLU / swish: x·sigmoid(x).
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// CLIP's quick GELU: x·sigmoid(1.702x).
#[inline(always)]
pub fn quick_gelu(x: f32) -> f32 {
    x / (1.0 + exp(-1.702 * x))
}

/// GELU, tanh approximation: 0.5x(1+tanh(√(2/π)(x+0.044715x³))).
///
/// Evaluated as x·sigmoid(2u) (the same function, since 0.5(1+tanh u) = sigmoid(2u)),
/// which needs one exp and keeps full relative accuracy for negative x.
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    const K: f32 = 0.797_884_6; // √(2/π)
    let u = K * (x + 0.044_715 * x * x * x);
    x / (1.0 + exp(-2.0 * u))
}

/// Exact GELU 0.5x(1+erf(x/√2)) = 0.5x·erfc(-x/√2), computed in f64 (~1e-7 relative).
#[inline(always)]
pub fn gelu_erf(x: f32) -> f32 {
    let x = f64::from(x);
    (0.5 * x * erfc64(-x * std::f64::consts::FRAC_1_SQRT_2)) as f32
}

/// ReLU; NaN stays NaN as in PyTorch.
#[inline(always)]
pub fn relu(x: f32) -> f32 {
    if x < 0.0 {
        0.0
    } else {
        x
    }
}

/// Hyperbolic tangent (std's, correctly rounded to ~1 ulp).
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    x.tanh()
}

/// Error function in f32, ~1e-7 relative.
#[inline]
pub fn erf(x: f32) -> f32 {
    erf64(f64::from(x)) as f32
}

/// e^x in f64 to ~1e-13 relative, branch-free so loops over it vectorise (libm's `exp`
/// does not, and made GELU-erf 10x slower than GELU-tanh). 0 below -708.
#[inline(always)]
fn exp64(x: f64) -> f64 {
    const LO: f64 = -708.0;
    const HI: f64 = 709.0;
    // 1.5 * 2^52: adding it rounds to an integer held in the low mantissa bits.
    const MAGIC: f64 = 6_755_399_441_055_744.0;
    let xc = x.clamp(LO, HI); // NaN stays NaN
    let t = xc * std::f64::consts::LOG2_E + MAGIC;
    let nf = t - MAGIC;
    let n = (t.to_bits() as i64).wrapping_sub(MAGIC.to_bits() as i64);
    let r = xc - nf * std::f64::consts::LN_2; // |r| ≤ ln2/2; n·ln2's rounding is < 1e-13·|x|
                                              // Taylor series to r^11/11!: remainder < 3e-14 for |r| ≤ 0.347.
    let mut p = 1.0 / 39_916_800.0;
    for c in
        [1.0 / 3_628_800.0, 1.0 / 362_880.0, 1.0 / 40_320.0, 1.0 / 5_040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0]
    {
        p = p * r + c;
    }
    let e = p * f64::from_bits(((n + 1023) as u64) << 52);
    if x < LO {
        0.0
    } else {
        e
    }
}

/// erfc(z) for z ≥ 0: the Chebyshev-fitted form from Numerical Recipes (`erfcc`),
/// relative error < 1.2e-7 everywhere, which keeps the far negative GELU tail accurate.
#[inline(always)]
fn erfc_nonneg(z: f64) -> f64 {
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07 + t * (-1.135_203_98 + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    t * exp64(-z * z + poly)
}

/// Complementary error function in f64 (~1.2e-7 relative).
#[inline(always)]
pub fn erfc64(x: f64) -> f64 {
    let e = erfc_nonneg(x.abs());
    if x < 0.0 {
        2.0 - e
    } else {
        e
    }
}

/// Error function in f64 (~1.2e-7 relative): Taylor series near 0, where 1 - erfc cancels.
#[inline]
pub fn erf64(x: f64) -> f64 {
    let a = x.abs();
    if a < 0.5 {
        // erf x = 2/√π Σ (-1)^n x^(2n+1) / (n! (2n+1)); 10 terms reach 1e-13 for |x| < 0.5.
        let x2 = x * x;
        let mut term = x; // (-1)^n x^(2n+1) / n!
        let mut sum = x;
        for n in 1..10 {
            term *= -x2 / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * std::f64::consts::FRAC_2_SQRT_PI
    } else {
        let r = 1.0 - erfc_nonneg(a);
        if x < 0.0 {
            -r
        } else {
            r
        }
    }
}

/// Applies `f` to every element in place, in parallel chunks, vectorised where `f` allows.
pub fn apply_unary_inplace<F: Fn(f32) -> f32 + Sync>(f: F, xs: &mut [f32]) {
    let f = &f;
    if xs.len() <= CHUNK {
        map_inplace_chunk(f, xs);
        return;
    }
    xs.par_chunks_mut(CHUNK).for_each(|c| map_inplace_chunk(f, c));
}

/// Writes `f(src[i])` to `dst[i]`, in parallel chunks.
pub fn apply_unary<F: Fn(f32) -> f32 + Sync>(f: F, src: &[f32], dst: &mut [f32]) {
    debug_assert_eq!(src.len(), dst.len());
    let f = &f;
    if src.len() <= CHUNK {
        map_chunk(f, src, dst);
        return;
    }
    dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(d, s)| map_chunk(f, s, d));
}

/// Writes `f(a[i], b[i])` to `dst[i]`, in parallel chunks.
pub fn apply_binary<F: Fn(f32, f32) -> f32 + Sync>(f: F, a: &[f32], b: &[f32], dst: &mut [f32]) {
    debug_assert_eq!(a.len(), dst.len());
    debug_assert_eq!(b.len(), dst.len());
    let f = &f;
    let run = |d: &mut [f32], a: &[f32], b: &[f32]| {
        vectorized(
            #[inline(always)]
            || {
                for ((d, &a), &b) in d.iter_mut().zip(a).zip(b) {
                    *d = f(a, b);
                }
            },
        )
    };
    if dst.len() <= CHUNK {
        run(dst, a, b);
        return;
    }
    dst.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK))).for_each(|(d, (a, b))| run(d, a, b));
}

#[inline(always)]
fn map_inplace_chunk<F: Fn(f32) -> f32>(f: &F, xs: &mut [f32]) {
    vectorized(
        #[inline(always)]
        || {
            for x in xs.iter_mut() {
                *x = f(*x);
            }
        },
    )
}

#[inline(always)]
fn map_chunk<F: Fn(f32) -> f32>(f: &F, src: &[f32], dst: &mut [f32]) {
    vectorized(
        #[inline(always)]
        || {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = f(s);
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::Rng;

    /// Relative error against an f64 reference, with an absolute floor for values near 0.
    fn check(name: &str, f: impl Fn(f32) -> f32 + Sync, r: impl Fn(f64) -> f64, lo: f32, hi: f32, tol: f64) {
        let mut rng = Rng::new(7);
        let xs: Vec<f32> = (0..20_000).map(|_| rng.uniform(lo, hi)).collect();
        let mut got = xs.clone();
        apply_unary_inplace(&f, &mut got);
        for (&x, &g) in xs.iter().zip(&got) {
            assert_eq!(g.to_bits(), f(x).to_bits(), "{name}: slice and scalar paths differ at {x}");
            let want = r(f64::from(x));
            let err = (f64::from(g) - want).abs() / want.abs().max(1e-30);
            assert!(err <= tol || (f64::from(g) - want).abs() < 1e-37, "{name}({x}) = {g}, want {want}, rel {err:e}");
        }
    }

    fn erf_ref(x: f64) -> f64 {
        // Taylor series in f64 is exact enough for |x| < 3; beyond, erf is 1 - tiny.
        if x.abs() > 3.0 {
            return x.signum() * (1.0 - erfc_ref(x.abs()));
        }
        let (mut term, mut sum) = (x, x);
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * std::f64::consts::FRAC_2_SQRT_PI
    }

    fn erfc_ref(x: f64) -> f64 {
        if x < 3.0 {
            return 1.0 - erf_ref(x);
        }
        // Continued fraction (Lentz-free backward evaluation), converges fast for x ≥ 3.
        let mut f = 0.0;
        for k in (1..200).rev() {
            f = (k as f64 / 2.0) / (x + f);
        }
        (-x * x).exp() / std::f64::consts::PI.sqrt() / (x + f)
    }

    #[test]
    fn exp_accuracy_and_edges() {
        check("exp", exp, f64::exp, -87.0, 88.0, 3e-7);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(0.0), 1.0);
        let want = f64::from(88.7f32).exp();
        assert!(((f64::from(exp(88.7)) - want) / want).abs() < 3e-7);
    }

    #[test]
    fn exp_nonpos_accuracy_and_edges() {
        check("exp_nonpos", exp_nonpos, f64::exp, -87.0, 0.0, 3e-7);
        assert_eq!(exp_nonpos(0.0), 1.0);
        assert_eq!(exp_nonpos(-88.0), 0.0);
        assert_eq!(exp_nonpos(f32::NEG_INFINITY), 0.0);
        assert!(exp_nonpos(f32::NAN).is_nan());
    }

    #[test]
    fn activations_match_f64() {
        // 0.5x(1+tanh u) written as x/(1+e^(-2u)) so the f64 reference does not cancel.
        let gelu_t = |x: f64| x / (1.0 + (-2.0 * (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).exp());
        // The far negative tail is e^(-2u) with |2u| up to 60: f32 rounding of u alone costs
        // |2u|·6e-8 relative there, so the bound is looser than for the other functions.
        check("gelu_tanh", gelu_tanh, gelu_t, -9.0, 9.0, 1.5e-5);
        let erfc_full = |y: f64| if y >= 0.0 { erfc_ref(y) } else { 2.0 - erfc_ref(-y) };
        check("gelu_erf", gelu_erf, |x| 0.5 * x * erfc_full(-x / 2f64.sqrt()), -8.0, 8.0, 1e-6);
        check("sigmoid", sigmoid, |x| 1.0 / (1.0 + (-x).exp()), -80.0, 80.0, 1e-6);
        check("silu", silu, |x| x / (1.0 + (-x).exp()), -30.0, 30.0, 1e-6);
        check("quick_gelu", quick_gelu, |x| x / (1.0 + (-1.702 * x).exp()), -30.0, 30.0, 5e-6);
        check("tanh", tanh, f64::tanh, -10.0, 10.0, 3e-7);
        check("relu", relu, |x| x.max(0.0), -3.0, 3.0, 0.0);
        assert!(relu(f32::NAN).is_nan());
    }

    #[test]
    fn tanh_fast_abs_error() {
        let mut rng = Rng::new(3);
        for _ in 0..20_000 {
            let x = rng.uniform(-12.0, 12.0);
            let err = (f64::from(tanh_fast(x)) - f64::from(x).tanh()).abs();
            assert!(err < 3e-7, "tanh_fast({x}) err {err:e}");
        }
        assert_eq!(tanh_fast(f32::INFINITY), 1.0);
        assert_eq!(tanh_fast(f32::NEG_INFINITY), -1.0);
    }

    #[test]
    fn exp64_accuracy() {
        let mut rng = Rng::new(13);
        for _ in 0..20_000 {
            let x = f64::from(rng.uniform(-700.0, 700.0)) + f64::from(rng.uniform(0.0, 1.0));
            let (got, want) = (exp64(x), x.exp());
            assert!(((got - want) / want).abs() < 1e-12, "exp64({x}) = {got}, want {want}");
        }
        assert_eq!(exp64(-800.0), 0.0);
        assert_eq!(exp64(f64::NEG_INFINITY), 0.0);
    }

    #[test]
    fn erf_accuracy() {
        let mut rng = Rng::new(11);
        for _ in 0..20_000 {
            let x = rng.uniform(-6.0, 6.0) as f64;
            let want = erf_ref(x);
            let got = erf64(x);
            assert!((got - want).abs() <= 2e-7 * want.abs().max(1e-300), "erf({x}) = {got}, want {want}");
            let want_c = if x >= 0.0 { erfc_ref(x) } else { 2.0 - erfc_ref(-x) };
            let got_c = erfc64(x);
            assert!((got_c - want_c).abs() <= 2e-7 * want_c, "erfc({x}) = {got_c}, want {want_c}");
        }
        assert_eq!(erf(0.0), 0.0);
    }

    #[test]
    fn binary_and_out_of_place() {
        let mut rng = Rng::new(5);
        let a: Vec<f32> = (0..40_000).map(|_| rng.uniform(-2.0, 2.0)).collect();
        let b: Vec<f32> = (0..40_000).map(|_| rng.uniform(-2.0, 2.0)).collect();
        let mut d = vec![0.0; a.len()];
        apply_binary(|x, y| x * y + 1.0, &a, &b, &mut d);
        for i in 0..a.len() {
            assert_eq!(d[i], a[i] * b[i] + 1.0);
        }
        apply_unary(relu, &a, &mut d);
        for i in 0..a.len() {
            assert_eq!(d[i], relu(a[i]));
        }
    }
}
