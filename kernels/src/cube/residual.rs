//! The residual junction between two RMS norms (kiln's `residual_rms_norm` op) as one launch.

use super::params::ResidualNormParams as P;
use super::{cube_reduce, load, BLOCK};
use cubecl::prelude::*;

/// What varies the code of a [`residual_norm`] launch.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct ResidualNormCfg {
    /// Scale by `1 + w` (Gemma) instead of `w`.
    pub add_one: bool,
    /// Normalise `o` by `w_post` before the add.
    pub post: bool,
    pub eps_bits: u32,
    /// Where x, o, w_post and w_pre live (arena or weights).
    pub in_arena: [bool; 4],
}

/// One cube (BLOCK units) per output row: row `r < rows` writes `h = x + rms_norm(o, w_post)`
/// (`x + o` without `post`) to output row `r` and `rms_norm(h, w_pre)` to row `rows_pad + r`,
/// with [`super::norm`]'s loops and reductions; rows `r >= rows` write zeros to both. Meta:
/// [`P`].
#[cube(launch_unchecked)]
pub fn residual_norm<F: Float>(arena: &mut Array<F>, weights: &Array<F>, meta: &Array<u32>, #[comptime] cfg: ResidualNormCfg) {
    let d = meta[P::D] as usize;
    let row = CUBE_POS_X as usize;
    let h0 = meta[P::OUT_OFF] as usize + row * d;
    let n0 = meta[P::OUT_OFF] as usize + (meta[P::ROWS_PAD] as usize + row) * d;
    let u = UNIT_POS as usize;
    let step = comptime!(BLOCK as usize);
    if row >= meta[P::ROWS] as usize {
        let mut j = u;
        while j < d {
            arena[h0 + j] = F::new(0.0);
            arena[n0 + j] = F::new(0.0);
            j += step;
        }
    } else {
        let x0 = meta[P::X_OFF] as usize + row * d;
        let o0 = meta[P::O_OFF] as usize + row * d;
        let wp0 = meta[P::W_POST_OFF] as usize;
        let w0 = meta[P::W_PRE_OFF] as usize;
        let eps = F::new(comptime!(f32::from_bits(cfg.eps_bits)));
        let mut r = F::new(0.0);
        if comptime!(cfg.post) {
            let mut s = F::new(0.0);
            let mut j = u;
            while j < d {
                let o = load::<F>(arena, weights, o0 + j, comptime!(cfg.in_arena[1]));
                s += o * o;
                j += step;
            }
            let ms = cube_reduce::<F>(s, false) / F::cast_from(d);
            r = F::new(1.0) / F::sqrt(ms + eps);
        }
        let mut s = F::new(0.0);
        let mut j = u;
        while j < d {
            let mut o = load::<F>(arena, weights, o0 + j, comptime!(cfg.in_arena[1]));
            if comptime!(cfg.post) {
                let mut w = load::<F>(arena, weights, wp0 + j, comptime!(cfg.in_arena[2]));
                if comptime!(cfg.add_one) {
                    w += F::new(1.0);
                }
                o = o * r * w;
            }
            let h = load::<F>(arena, weights, x0 + j, comptime!(cfg.in_arena[0])) + o;
            arena[h0 + j] = h;
            s += h * h;
            j += step;
        }
        let ms = cube_reduce::<F>(s, false) / F::cast_from(d);
        let r2 = F::new(1.0) / F::sqrt(ms + eps);
        let mut j = u;
        while j < d {
            let mut w = load::<F>(arena, weights, w0 + j, comptime!(cfg.in_arena[3]));
            if comptime!(cfg.add_one) {
                w += F::new(1.0);
            }
            arena[n0 + j] = arena[h0 + j] * r2 * w;
            j += step;
        }
    }
}
