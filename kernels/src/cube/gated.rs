//! A gated linear unit's two products and their epilogue as one launch (kiln's
//! `gated_matmul` op): each unit accumulates its output element of `a @ b[0]` (the gate) and
//! of `a @ b[1]` (up) over the same shared-memory tiles of `a`, then evaluates the epilogue
//! on both, so neither product is stored.

use super::params::MatmulParams;
use super::{expr, load, strided_index, typed, KInstr, TILE};
use cubecl::prelude::*;

/// What varies the code of a [`gated_matmul`] launch.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct GatedCfg {
    pub transpose_b: bool,
    pub a_in_arena: bool,
    pub b_in_arena: bool,
    /// The epilogue (input 0 the gate product, input 1 the up product) and where and how its
    /// other inputs are stored.
    pub code: Vec<KInstr>,
    pub srcs: Vec<typed::Src>,
    /// Rank of the output (for the epilogue's broadcast inputs).
    pub rank: usize,
}

/// Cube `(ceil(n/TILE), ceil(m/TILE), batch)`, TILE x TILE units, as [`super::matmul`]. Meta:
/// [`MatmulParams`], whose `b` is the gate's weight `[k, n]` (`[n, k]` with `transpose_b`);
/// the up weight follows it at `b + k * n` (the two stacked, `[2, k, n]`).
#[cube(launch_unchecked)]
pub fn gated_matmul<F: Float>(arena: &mut Array<F>, weights: &Array<F>, meta: &Array<u32>, #[comptime] cfg: GatedCfg) {
    let m = meta[MatmulParams::M] as usize;
    let n = meta[MatmulParams::N] as usize;
    let k = meta[MatmulParams::K] as usize;
    let rank = comptime!(cfg.rank);
    let brank = comptime!(cfg.rank - 2);
    let tile = comptime!(TILE as usize);
    let tx = UNIT_POS_X as usize;
    let ty = UNIT_POS_Y as usize;
    let row = CUBE_POS_Y as usize * tile + ty;
    let col = CUBE_POS_X as usize * tile + tx;
    let batch = CUBE_POS_Z as usize;
    let a0 = strided_index(meta, batch, MatmulParams::SHAPE, comptime!(MatmulParams::a_at(rank)), brank);
    let g0 = strided_index(meta, batch, MatmulParams::SHAPE, comptime!(MatmulParams::b_at(rank)), brank);
    let u0 = g0 + k * n;
    let mut a_tile = SharedMemory::<F>::new(comptime!(tile * tile));
    let mut g_tile = SharedMemory::<F>::new(comptime!(tile * tile));
    let mut u_tile = SharedMemory::<F>::new(comptime!(tile * tile));
    let mut gate = F::new(0.0);
    let mut up = F::new(0.0);
    let tiles = k.div_ceil(tile);
    for t in 0..tiles {
        let ka = t * tile + tx;
        let mut av = F::new(0.0);
        if row < m && ka < k {
            av = load::<F>(arena, weights, a0 + row * k + ka, cfg.a_in_arena);
        }
        a_tile[ty * tile + tx] = av;
        let kb = t * tile + ty;
        let mut gv = F::new(0.0);
        let mut uv = F::new(0.0);
        if kb < k && col < n {
            let at = if comptime!(cfg.transpose_b) { col * k + kb } else { kb * n + col };
            gv = load::<F>(arena, weights, g0 + at, cfg.b_in_arena);
            uv = load::<F>(arena, weights, u0 + at, cfg.b_in_arena);
        }
        g_tile[ty * tile + tx] = gv;
        u_tile[ty * tile + tx] = uv;
        sync_cube();
        #[unroll]
        for e in 0..tile {
            let av = a_tile[ty * tile + e];
            gate += av * g_tile[e * tile + tx];
            up += av * u_tile[e * tile + tx];
        }
        sync_cube();
    }
    if row < m && col < n {
        let o = (batch * m + row) * n + col;
        let mut ins = Sequence::<F>::new();
        ins.push(gate);
        ins.push(up);
        #[unroll]
        for j in 0..cfg.srcs.len() {
            let i = strided_index(meta, o, MatmulParams::SHAPE, comptime!(MatmulParams::epilogue_at(rank, j)), rank);
            ins.push(typed::read::<F>(arena, weights, i, comptime!(cfg.srcs[j])));
        }
        let out = meta[MatmulParams::OUT_OFF] as usize + o;
        arena[out] = expr::eval::<F>(&ins, comptime!(cfg.code.clone()));
    }
}
