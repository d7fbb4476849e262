//! CubeCL kernels, generic over the CubeCL runtime (wgpu on Vulkan/Metal or lavapipe, CUDA).
//!
//! Memory model: a program's intermediates live in one device buffer (the arena, laid out by
//! the memory plan) and its weights and constants in another; every operand is an element
//! offset into one of the two. Each kernel reads its sizes and offsets from a small `u32`
//! metadata block uploaded once when the program is loaded, so a launch binds the same three
//! buffers every time and no step allocates. What varies the generated code (the fused
//! expression, which buffer an operand is in, the rank, head dims) is a comptime value.
//!
//! Each metadata block is a typed struct of [`params`], which the compiler (`kiln-runtime`'s
//! cube backend) packs and the kernel reads at the slots declared beside the struct.

// `#[cube]` code indexes in unrolled comptime loops and matches on comptime values: the
// iterator and `if let` forms clippy suggests are not what CubeCL's macro expands.
#![allow(clippy::needless_range_loop, clippy::single_match, clippy::collapsible_match)]

pub mod expr;
pub mod gated;
pub mod index;
pub mod params;
pub mod reduce;
pub mod residual;
pub mod typed;

use cubecl::prelude::*;
pub use expr::KInstr;
pub use gated::GatedCfg;
use params::{AttentionParams, CopyParams, FusedParams, MatmulParams, NormParams, ResizeParams};
pub use typed::{Repr, Src};

/// Units per cube of the 1-D kernels.
pub const BLOCK: u32 = 128;
/// Tile edge of the matmul kernel (a TILE x TILE cube computes a TILE x TILE output block).
pub const TILE: u32 = 16;
/// Query rows per cube of the attention kernel (one unit each).
pub const ATT_BQ: u32 = 16;
/// Keys per shared-memory tile of the attention kernel.
pub const ATT_BK: u32 = 16;

/// Reads element `i` of the arena or of the weights buffer.
#[cube]
fn load<F: Float>(arena: &Array<F>, weights: &Array<F>, i: usize, #[comptime] in_arena: bool) -> F {
    if comptime!(in_arena) {
        arena[i]
    } else {
        weights[i]
    }
}

/// The offset of output element `o` in an operand broadcast (or strided) over a `rank`-axis
/// shape: `meta[shape_at..]` holds the shape, `meta[at]` the operand's base offset and
/// `meta[at + 1..]` its strides (a [`params::Strided`]).
#[cube]
pub(crate) fn strided_index(meta: &Array<u32>, o: usize, shape_at: usize, at: usize, #[comptime] rank: usize) -> usize {
    let mut idx = meta[at] as usize;
    let mut rem = o;
    #[unroll]
    for r in 0..rank {
        let d = rank - 1 - r;
        let extent = meta[shape_at + d] as usize;
        idx += (rem % extent) * (meta[at + 1 + d] as usize);
        rem /= extent;
    }
    idx
}

/// Where part `part`'s metadata block starts in a launch of `parts` independent parts (one
/// kernel run on several parameter sets at once): with one part, the block bound; with more,
/// the bound block starts with `parts` words, each the start of a part's block in it
/// ([`params::multi`]).
#[cube]
pub(crate) fn part_base(meta: &Array<u32>, part: u32, #[comptime] parts: u32) -> usize {
    let mut base = 0usize;
    if comptime!(parts > 1) {
        base = meta[part as usize] as usize;
    }
    base
}

/// What varies the code of a [`copy`] launch.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct CopyCfg {
    pub rank: usize,
    /// Per part (independent copies run by this launch, one per `CUBE_POS_Y`: [`part_base`]):
    /// whether its source is in the arena, else in the `src` buffer.
    pub src_in_arena: Vec<bool>,
}

impl CopyCfg {
    /// The copies this launch runs.
    pub fn parts(&self) -> u32 {
        self.src_in_arena.len() as u32
    }
}

/// Strided copy into the arena: permute, slice, broadcast, the inputs of a concat (one part
/// each), and the upload of entry inputs. Meta: [`CopyParams`] per part.
#[cube(launch_unchecked)]
pub fn copy<F: Float>(arena: &mut Array<F>, src: &Array<F>, meta: &Array<u32>, #[comptime] cfg: CopyCfg) {
    let parts = comptime!(cfg.parts());
    let part = CUBE_POS_Y;
    let base = part_base(meta, part, parts);
    let n = meta[base + CopyParams::N] as usize;
    let o = ABSOLUTE_POS_X as usize;
    if o < n {
        let rank = comptime!(cfg.rank);
        let s = strided_index(meta, o, base + CopyParams::SHAPE, base + comptime!(CopyParams::src_at(rank)), rank);
        let d = strided_index(meta, o, base + CopyParams::SHAPE, base + comptime!(CopyParams::dst_at(rank)), rank);
        if comptime!(parts == 1) {
            arena[d] = load::<F>(arena, src, s, comptime!(cfg.src_in_arena[0]));
        } else {
            // Each part's source buffer is fixed at expansion: one branch per part.
            #[unroll]
            for p in 0..parts {
                if part == p {
                    arena[d] = load::<F>(arena, src, s, comptime!(cfg.src_in_arena[p as usize]));
                }
            }
        }
    }
}

/// One half of reordering a state's batch rows in place (`Session::gather_state_rows`):
/// `params` = `[offset, row_words, n, rows..]` in words of the arena. `back == false`
/// gathers: `scratch[i] = arena[offset + rows[i / row_words] * row_words + i % row_words]`;
/// `back == true` writes the scratch over the state: `arena[offset + i] = scratch[i]`, for
/// `i < n` (rows may repeat, so the rows cannot move within the arena directly).
#[cube(launch_unchecked)]
pub fn state_rows<F: Float>(arena: &mut Array<F>, scratch: &mut Array<F>, params: &Array<u32>, #[comptime] back: bool) {
    let i = ABSOLUTE_POS;
    let n = params[2] as usize;
    if i < n {
        let offset = params[0] as usize;
        if comptime!(back) {
            arena[offset + i] = scratch[i];
        } else {
            let w = params[1] as usize;
            let r = params[3 + i / w] as usize;
            scratch[i] = arena[offset + r * w + i % w];
        }
    }
}

/// What varies the code of a [`fused`] launch.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct FusedCfg {
    pub code: Vec<KInstr>,
    /// Per input: where it lives and how it is stored.
    pub srcs: Vec<Src>,
    pub rank: usize,
    /// How the output is stored; a byte output is written four elements per unit.
    pub out: Repr,
    /// Whether the output is `bool` (else, for bytes, `u8`).
    pub out_bool: bool,
}

/// Element `o` of a fused region.
#[cube]
fn fused_at<F: Float>(arena: &Array<F>, weights: &Array<F>, meta: &Array<u32>, o: usize, #[comptime] cfg: FusedCfg) -> F {
    let rank = comptime!(cfg.rank);
    let mut ins = Sequence::<F>::new();
    #[unroll]
    for k in 0..cfg.srcs.len() {
        let i = strided_index(meta, o, FusedParams::SHAPE, comptime!(FusedParams::input_at(rank, k)), rank);
        ins.push(typed::read::<F>(arena, weights, i, comptime!(cfg.srcs[k])));
    }
    expr::eval::<F>(&ins, comptime!(cfg.code.clone()))
}

/// A fused elementwise region, one unit per output element (per four, for a byte output).
/// Meta: [`FusedParams`], offsets in each operand's element units.
#[cube(launch_unchecked)]
pub fn fused<F: Float>(arena: &mut Array<F>, weights: &Array<F>, meta: &Array<u32>, #[comptime] cfg: FusedCfg) {
    let n = meta[FusedParams::N] as usize;
    let out = meta[FusedParams::OUT_OFF] as usize;
    match comptime!(cfg.out) {
        Repr::Byte => {
            let w = ABSOLUTE_POS;
            if w * 4 < n {
                let mut word = 0u32;
                for e in 0..4usize {
                    let o = w * 4 + e;
                    if o < n {
                        let v = fused_at::<F>(arena, weights, meta, o, comptime!(cfg.clone()));
                        word |= typed::byte_of::<F>(v, cfg.out_bool) << ((e * 8) as u32);
                    }
                }
                typed::write_bytes::<F>(arena, out + w * 4, word);
            }
        }
        _ => {
            let o = ABSOLUTE_POS;
            if o < n {
                let v = fused_at::<F>(arena, weights, meta, o, comptime!(cfg.clone()));
                typed::write::<F>(arena, out + o, v, comptime!(cfg.out));
            }
        }
    }
}

/// What varies the code of a [`matmul`] launch.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct MatmulCfg {
    pub transpose_b: bool,
    pub a_in_arena: bool,
    pub b_in_arena: bool,
    /// The epilogue (input 0 is the product) and where and how its other inputs are stored
    /// (an integer input is read as a number, through a cast in the epilogue).
    pub epilogue: Option<(Vec<KInstr>, Vec<typed::Src>)>,
    /// Rank of the output (for the epilogue's broadcast inputs).
    pub rank: usize,
    /// Independent products run by this launch: cube `z` runs part `z % parts`
    /// ([`part_base`]), batch `z / parts` (nothing past that part's batch count).
    pub parts: u32,
    /// Per part: where the position of the cache row write it also does is stored, if it does
    /// one ([`index::store_row`], its block after the part's [`MatmulParams`]).
    pub stores: Vec<Option<Src>>,
}

/// Batched matmul with shared-memory tiles and an optional fused epilogue. Cube
/// `(ceil(n/TILE), ceil(m/TILE), batch * parts)` (the largest part's tiles and batch count),
/// TILE x TILE units. Meta: [`MatmulParams`] per part; a batch stride of 0 broadcasts that
/// operand. `b` is `[k, n]`, or `[n, k]` with `transpose_b`.
#[cube(launch_unchecked)]
pub fn matmul<F: Float>(arena: &mut Array<F>, weights: &Array<F>, meta: &Array<u32>, #[comptime] cfg: MatmulCfg) {
    let parts = comptime!(cfg.parts);
    let base = part_base(meta, CUBE_POS_Z % parts, parts);
    let mut m = meta[base + MatmulParams::M] as usize;
    let mut n = meta[base + MatmulParams::N] as usize;
    let k = meta[base + MatmulParams::K] as usize;
    let rank = comptime!(cfg.rank);
    let brank = comptime!(cfg.rank - 2);
    if comptime!(parts > 1) {
        // A cube past its part's batch count loads and writes nothing.
        let mut batches = 1usize;
        #[unroll]
        for d in 0..brank {
            batches *= meta[base + MatmulParams::SHAPE + d] as usize;
        }
        if (CUBE_POS_Z / parts) as usize >= batches {
            m = 0;
            n = 0;
        }
    }
    let tile = comptime!(TILE as usize);
    let tx = UNIT_POS_X as usize;
    let ty = UNIT_POS_Y as usize;
    let row = CUBE_POS_Y as usize * tile + ty;
    let col = CUBE_POS_X as usize * tile + tx;
    let batch = (CUBE_POS_Z / parts) as usize;
    let a0 = strided_index(meta, batch, base + MatmulParams::SHAPE, base + comptime!(MatmulParams::a_at(rank)), brank);
    let b0 = strided_index(meta, batch, base + MatmulParams::SHAPE, base + comptime!(MatmulParams::b_at(rank)), brank);
    let mut a_tile = SharedMemory::<F>::new(comptime!(tile * tile));
    let mut b_tile = SharedMemory::<F>::new(comptime!(tile * tile));
    let mut acc = F::new(0.0);
    let tiles = k.div_ceil(tile);
    for t in 0..tiles {
        let ka = t * tile + tx;
        let mut av = F::new(0.0);
        if row < m && ka < k {
            av = load::<F>(arena, weights, a0 + row * k + ka, cfg.a_in_arena);
        }
        a_tile[ty * tile + tx] = av;
        let kb = t * tile + ty;
        let mut bv = F::new(0.0);
        if kb < k && col < n {
            if comptime!(cfg.transpose_b) {
                bv = load::<F>(arena, weights, b0 + col * k + kb, cfg.b_in_arena);
            } else {
                bv = load::<F>(arena, weights, b0 + kb * n + col, cfg.b_in_arena);
            }
        }
        b_tile[ty * tile + tx] = bv;
        sync_cube();
        #[unroll]
        for e in 0..tile {
            acc += a_tile[ty * tile + e] * b_tile[e * tile + tx];
        }
        sync_cube();
    }
    if row < m && col < n {
        let o = (batch * m + row) * n + col;
        let out = meta[base + MatmulParams::OUT_OFF] as usize + o;
        let mut v = acc;
        let n_epi = comptime!(cfg.epilogue.as_ref().map_or(0, |e| e.1.len()));
        match comptime!(cfg.epilogue.clone()) {
            Some((code, srcs)) => {
                let rank = comptime!(cfg.rank);
                let mut ins = Sequence::<F>::new();
                ins.push(acc);
                #[unroll]
                for j in 0..srcs.len() {
                    let i = strided_index(meta, o, base + MatmulParams::SHAPE, base + comptime!(MatmulParams::epilogue_at(rank, j)), rank);
                    ins.push(typed::read::<F>(arena, weights, i, comptime!(srcs[j])));
                }
                v = expr::eval::<F>(&ins, code);
            }
            None => {}
        }
        arena[out] = v;
        #[unroll]
        for p in 0..parts {
            match comptime!(cfg.stores[p as usize]) {
                Some(idx) => {
                    if CUBE_POS_Z % parts == p {
                        index::store_row::<F>(arena, weights, meta, base + comptime!(MatmulParams::epilogue_at(rank, n_epi)), o, v, idx);
                    }
                }
                None => {}
            }
        }
    }
}

/// Which row-wise normalisation a [`norm`] launch computes.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum NormKind {
    /// `(x - mean) / sqrt(var + eps) * w + b`.
    Layer,
    /// `x / sqrt(mean(x^2) + eps) * w`, or `* (1 + w)`.
    Rms { add_one: bool },
    /// `exp(x - max) / sum`.
    Softmax,
}

/// What varies the code of a [`norm`] launch.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct NormCfg {
    pub kind: NormKind,
    pub eps_bits: u32,
    /// Where the input, weight and bias live (unused ones ignored).
    pub in_arena: [bool; 3],
}

/// Sum (or max) of one value per unit over the cube, through shared memory.
#[cube]
fn cube_reduce<F: Float>(v: F, #[comptime] is_max: bool) -> F {
    let mut red = SharedMemory::<F>::new(comptime!(BLOCK as usize));
    let u = UNIT_POS as usize;
    red[u] = v;
    sync_cube();
    #[unroll]
    for s in 0..comptime!(BLOCK.trailing_zeros()) {
        let stride = comptime!((BLOCK >> (s + 1)) as usize);
        if u < stride {
            if comptime!(is_max) {
                red[u] = F::max(red[u], red[u + stride]);
            } else {
                red[u] = red[u] + red[u + stride];
            }
        }
        sync_cube();
    }
    let r = red[0];
    sync_cube();
    r
}

/// Layer norm, RMS norm or softmax over the last axis, one cube (BLOCK units) per row. Meta:
/// [`NormParams`].
#[cube(launch_unchecked)]
pub fn norm<F: Float>(arena: &mut Array<F>, weights: &Array<F>, meta: &Array<u32>, #[comptime] cfg: NormCfg) {
    let d = meta[NormParams::D] as usize;
    let row = CUBE_POS_X as usize;
    let x0 = meta[NormParams::X_OFF] as usize + row * d;
    let out0 = meta[NormParams::OUT_OFF] as usize + row * d;
    let w0 = meta[NormParams::W_OFF] as usize;
    let b0 = meta[NormParams::B_OFF] as usize;
    let u = UNIT_POS as usize;
    let step = comptime!(BLOCK as usize);
    let eps = F::new(comptime!(f32::from_bits(cfg.eps_bits)));
    let xa = comptime!(cfg.in_arena[0]);
    match comptime!(cfg.kind) {
        NormKind::Layer => {
            let mut s = F::new(0.0);
            let mut j = u;
            while j < d {
                s += load::<F>(arena, weights, x0 + j, xa);
                j += step;
            }
            let mean = cube_reduce::<F>(s, false) / F::cast_from(d);
            let mut v = F::new(0.0);
            let mut j = u;
            while j < d {
                let c = load::<F>(arena, weights, x0 + j, xa) - mean;
                v += c * c;
                j += step;
            }
            let var = cube_reduce::<F>(v, false) / F::cast_from(d);
            let r = F::new(1.0) / F::sqrt(var + eps);
            let mut j = u;
            while j < d {
                let x = load::<F>(arena, weights, x0 + j, xa);
                let w = load::<F>(arena, weights, w0 + j, comptime!(cfg.in_arena[1]));
                let b = load::<F>(arena, weights, b0 + j, comptime!(cfg.in_arena[2]));
                arena[out0 + j] = (x - mean) * r * w + b;
                j += step;
            }
        }
        NormKind::Rms { add_one } => {
            let mut s = F::new(0.0);
            let mut j = u;
            while j < d {
                let x = load::<F>(arena, weights, x0 + j, xa);
                s += x * x;
                j += step;
            }
            let ms = cube_reduce::<F>(s, false) / F::cast_from(d);
            let r = F::new(1.0) / F::sqrt(ms + eps);
            let mut j = u;
            while j < d {
                let x = load::<F>(arena, weights, x0 + j, xa);
                let mut w = load::<F>(arena, weights, w0 + j, comptime!(cfg.in_arena[1]));
                if comptime!(add_one) {
                    w += F::new(1.0);
                }
                arena[out0 + j] = x * r * w;
                j += step;
            }
        }
        NormKind::Softmax => {
            let mut mx = F::new(-3.0e38);
            let mut j = u;
            while j < d {
                mx = F::max(mx, load::<F>(arena, weights, x0 + j, xa));
                j += step;
            }
            let mx = cube_reduce::<F>(mx, true);
            let mut s = F::new(0.0);
            let mut j = u;
            while j < d {
                s += F::exp(load::<F>(arena, weights, x0 + j, xa) - mx);
                j += step;
            }
            let z = cube_reduce::<F>(s, false);
            let mut j = u;
            while j < d {
                arena[out0 + j] = F::exp(load::<F>(arena, weights, x0 + j, xa) - mx) / z;
                j += step;
            }
        }
    }
}

/// The attention mask a launch applies (positions come from the metadata).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum AttMask {
    None,
    /// Key `j` visible to query `i` when `j <= q_offset + i`.
    Causal,
    /// Causal, and `j + window > q_offset + i`.
    Sliding,
    /// An additive `[batch, sq, sk]` bias (`-inf` hides a key).
    Additive {
        in_arena: bool,
    },
    /// Causal from run-time positions (the graph's `PosMask`): query `i` at key index
    /// `start + i`, with a window (from the metadata) when `window`, key padding `keep`
    /// (0 hides a key) and a prefix length per batch row (queries and keys below it see each
    /// other). A cube
    /// reads no key past the last one its queries may see.
    Positions {
        window: bool,
        start: Src,
        keep: Option<Src>,
        prefix: Option<Src>,
    },
}

/// What varies the code of an [`attention`] launch.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct AttentionCfg {
    pub d: usize,
    pub dv: usize,
    pub scale_bits: u32,
    pub softcap_bits: Option<u32>,
    pub mask: AttMask,
    /// Where q, k and v live.
    pub in_arena: [bool; 3],
}

/// Flash-style attention: a cube takes ATT_BQ query rows of one (batch, head), one unit per
/// row; key and value tiles of ATT_BK rows are staged in shared memory and every unit folds
/// them into its row with an online softmax, so no score matrix is written. Grouped-query:
/// query head `h` reads key head `h / (hq / hkv)`. Cube `(ceil(sq/ATT_BQ), hq, batch)`. Meta:
/// [`AttentionParams`].
#[cube(launch_unchecked)]
pub fn attention<F: Float>(arena: &mut Array<F>, weights: &Array<F>, meta: &Array<u32>, #[comptime] cfg: AttentionCfg) {
    let sq = meta[AttentionParams::SQ] as usize;
    let sk = meta[AttentionParams::SK] as usize;
    let hq = meta[AttentionParams::HQ] as usize;
    let hkv = meta[AttentionParams::HKV] as usize;
    let d = comptime!(cfg.d);
    let dv = comptime!(cfg.dv);
    let bq = comptime!(ATT_BQ as usize);
    let bk = comptime!(ATT_BK as usize);
    let u = UNIT_POS as usize;
    let i = CUBE_POS_X as usize * bq + u;
    let h = CUBE_POS_Y as usize;
    let b = CUBE_POS_Z as usize;
    let kh = h / (hq / hkv);
    let window = meta[AttentionParams::WINDOW] as usize;
    let q_offset = att_start::<F>(arena, weights, meta, comptime!(cfg.mask));
    let prefix = att_prefix::<F>(arena, weights, meta, b, comptime!(cfg.mask));
    // Keys past `kend` (for a position mask, past the last one the cube's queries may see:
    // the filled part of a cache) are never read.
    let mut kend = sk;
    if comptime!(matches!(cfg.mask, AttMask::Positions { .. })) {
        let mut hi = q_offset + sq;
        if CUBE_POS_X as usize * bq + bq < sq {
            hi = q_offset + CUBE_POS_X as usize * bq + bq;
        }
        if prefix > hi {
            hi = prefix;
        }
        if hi < sk {
            kend = hi;
        }
    }
    let scale = F::new(comptime!(f32::from_bits(cfg.scale_bits)));

    let mut q = Array::<F>::new(d);
    let mut acc = Array::<F>::new(dv);
    let live = i < sq;
    let q0 = meta[AttentionParams::Q_OFF] as usize + ((b * sq + i) * hq + h) * d;
    #[unroll]
    for c in 0..d {
        let mut x = F::new(0.0);
        if live {
            x = load::<F>(arena, weights, q0 + c, comptime!(cfg.in_arena[0]));
        }
        q[c] = x;
    }
    #[unroll]
    for c in 0..dv {
        acc[c] = F::new(0.0);
    }
    let mut m = F::new(-3.0e38);
    let mut l = F::new(0.0);
    let mut k_tile = SharedMemory::<F>::new(comptime!(ATT_BK as usize * cfg.d));
    let mut v_tile = SharedMemory::<F>::new(comptime!(ATT_BK as usize * cfg.dv));
    let tiles = kend.div_ceil(bk);
    for t in 0..tiles {
        let mut idx = u;
        while idx < bk * d {
            let j = t * bk + idx / d;
            let mut x = F::new(0.0);
            if j < kend {
                x = load::<F>(
                    arena,
                    weights,
                    meta[AttentionParams::K_OFF] as usize + ((b * sk + j) * hkv + kh) * d + idx % d,
                    comptime!(cfg.in_arena[1]),
                );
            }
            k_tile[idx] = x;
            idx += bq;
        }
        let mut idx = u;
        while idx < bk * dv {
            let j = t * bk + idx / dv;
            let mut x = F::new(0.0);
            if j < kend {
                x = load::<F>(
                    arena,
                    weights,
                    meta[AttentionParams::V_OFF] as usize + ((b * sk + j) * hkv + kh) * dv + idx % dv,
                    comptime!(cfg.in_arena[2]),
                );
            }
            v_tile[idx] = x;
            idx += bq;
        }
        sync_cube();
        if live {
            for kk in 0..bk {
                let j = t * bk + kk;
                let visible = att_visible::<F>(arena, weights, meta, b, sk, kend, q_offset + i, j, window, prefix, cfg.mask);
                if visible {
                    let mut s = F::new(0.0);
                    #[unroll]
                    for c in 0..d {
                        s += q[c] * k_tile[kk * d + c];
                    }
                    s *= scale;
                    match comptime!(cfg.softcap_bits) {
                        Some(bits) => {
                            let cap = F::new(comptime!(f32::from_bits(bits)));
                            s = cap * F::tanh(s / cap);
                        }
                        None => {}
                    }
                    match comptime!(cfg.mask) {
                        AttMask::Additive { in_arena } => {
                            s += load::<F>(arena, weights, meta[AttentionParams::MASK_OFF] as usize + (b * sq + i) * sk + j, in_arena);
                        }
                        _ => {}
                    }
                    // A -inf bias hides the key, as in the interpreter.
                    if s > F::new(-3.0e38) {
                        let m_new = F::max(m, s);
                        let corr = F::exp(m - m_new);
                        let p = F::exp(s - m_new);
                        l = l * corr + p;
                        #[unroll]
                        for c in 0..dv {
                            acc[c] = acc[c] * corr + p * v_tile[kk * dv + c];
                        }
                        m = m_new;
                    }
                }
            }
        }
        sync_cube();
    }
    if live {
        let o0 = meta[AttentionParams::OUT_OFF] as usize + ((b * sq + i) * hq + h) * dv;
        #[unroll]
        for c in 0..dv {
            let mut y = F::new(0.0);
            if l > F::new(0.0) {
                y = acc[c] / l;
            }
            arena[o0 + c] = y;
        }
    }
}

/// Key index of query 0: the metadata's, or a position mask's start operand (negative reads 0).
#[cube]
fn att_start<F: Float>(arena: &Array<F>, weights: &Array<F>, meta: &Array<u32>, #[comptime] mask: AttMask) -> usize {
    let mut q_offset = meta[AttentionParams::Q_OFFSET] as usize;
    match comptime!(mask) {
        AttMask::Positions { start, .. } => {
            let st = typed::read::<F>(arena, weights, meta[AttentionParams::START_OFF] as usize, start);
            q_offset = u32::cast_from(F::max(st, F::new(0.0))) as usize;
        }
        _ => {}
    }
    q_offset
}

/// A position mask's prefix length for batch row `b` (0 without one).
#[cube]
fn att_prefix<F: Float>(arena: &Array<F>, weights: &Array<F>, meta: &Array<u32>, b: usize, #[comptime] mask: AttMask) -> usize {
    let mut prefix = 0usize;
    match comptime!(mask) {
        AttMask::Positions { prefix: pre, .. } => match comptime!(pre) {
            Some(ps) => {
                let pv = typed::read::<F>(arena, weights, meta[AttentionParams::PREFIX_OFF] as usize + b, ps);
                prefix = u32::cast_from(F::max(pv, F::new(0.0))) as usize;
            }
            None => {}
        },
        _ => {}
    }
    prefix
}

/// Whether key `j` (below `kend`) is visible to the query at key index `qpos` of batch row `b`.
// The `if` stays inside the comptime match: `#[cube]` matches take no guards.
#[allow(clippy::too_many_arguments, clippy::collapsible_match)]
#[cube]
fn att_visible<F: Float>(
    arena: &Array<F>,
    weights: &Array<F>,
    meta: &Array<u32>,
    b: usize,
    sk: usize,
    kend: usize,
    qpos: usize,
    j: usize,
    window: usize,
    prefix: usize,
    #[comptime] mask: AttMask,
) -> bool {
    let mut visible = j < kend;
    match comptime!(mask) {
        AttMask::Causal => {
            visible = visible && j <= qpos;
        }
        AttMask::Sliding => {
            visible = visible && j <= qpos && j + window > qpos;
        }
        AttMask::None => {}
        AttMask::Additive { .. } => {}
        AttMask::Positions { window: windowed, keep, .. } => {
            let mut causal = j <= qpos;
            if comptime!(windowed) {
                causal = causal && j + window > qpos;
            }
            visible = visible && (causal || (qpos < prefix && j < prefix));
            match comptime!(keep) {
                Some(ks) => {
                    // Read only for a key inside the cache (the last tile runs past it).
                    if visible {
                        let kv = typed::read::<F>(arena, weights, meta[AttentionParams::KEEP_OFF] as usize + b * sk + j, ks);
                        visible = kv != F::new(0.0);
                    }
                }
                None => {}
            }
        }
    }
    visible
}

/// What varies the code of a [`resize`] launch.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct ResizeCfg {
    pub bicubic: bool,
    pub in_arena: bool,
}

/// Where output position `o` samples along an axis of `i_len` -> `o_len` (PyTorch's
/// `interpolate`, `align_corners=False`).
#[cube]
fn tap_src<F: Float>(o: usize, i_len: usize, o_len: usize, #[comptime] bicubic: bool) -> F {
    let scale = F::cast_from(i_len as u32) / F::cast_from(o_len as u32);
    let src = (F::cast_from(o as u32) + F::new(0.5)) * scale - F::new(0.5);
    if comptime!(bicubic) {
        src
    } else {
        F::max(src, F::new(0.0))
    }
}

/// The source index of tap `q`, clamped to the axis.
#[cube]
fn tap_index<F: Float>(src: F, i_len: usize, q: usize, #[comptime] bicubic: bool) -> usize {
    let i0 = i32::cast_from(F::floor(src));
    let lead = comptime!(if bicubic { 1i32 } else { 0i32 });
    let idx = i0 - lead + q as i32;
    let hi = i_len as i32 - 1;
    i32::max(i32::min(idx, hi), 0) as usize
}

/// The weight of tap `q` (bicubic with a = -0.75, as PyTorch).
#[cube]
fn tap_weight<F: Float>(src: F, q: usize, #[comptime] bicubic: bool) -> F {
    let t = src - F::floor(src);
    let mut w = F::new(1.0) - t;
    if comptime!(bicubic) {
        let a = F::new(-0.75);
        if q == 0 {
            let d = t + F::new(1.0);
            w = ((a * d - F::new(5.0) * a) * d + F::new(8.0) * a) * d - F::new(4.0) * a;
        } else if q == 1 {
            w = ((a + F::new(2.0)) * t - (a + F::new(3.0))) * t * t + F::new(1.0);
        } else if q == 2 {
            let d = F::new(1.0) - t;
            w = ((a + F::new(2.0)) * d - (a + F::new(3.0))) * d * d + F::new(1.0);
        } else {
            let d = F::new(2.0) - t;
            w = ((a * d - F::new(5.0) * a) * d + F::new(8.0) * a) * d - F::new(4.0) * a;
        }
    } else if q == 1 {
        w = t;
    }
    w
}

/// Resampling of the last two axes, one unit per output element. Meta: [`ResizeParams`].
#[cube(launch_unchecked)]
pub fn resize<F: Float>(arena: &mut Array<F>, weights: &Array<F>, meta: &Array<u32>, #[comptime] cfg: ResizeCfg) {
    let n = meta[ResizeParams::N] as usize;
    let o = ABSOLUTE_POS;
    if o < n {
        let ih = meta[ResizeParams::IH] as usize;
        let iw = meta[ResizeParams::IW] as usize;
        let oh = meta[ResizeParams::OH] as usize;
        let ow = meta[ResizeParams::OW] as usize;
        let p = o / (oh * ow);
        let oy = (o / ow) % oh;
        let ox = o % ow;
        let base = meta[ResizeParams::X_OFF] as usize + p * ih * iw;
        let taps = comptime!(if cfg.bicubic { 4usize } else { 2usize });
        let sy = tap_src::<F>(oy, ih, oh, cfg.bicubic);
        let sx = tap_src::<F>(ox, iw, ow, cfg.bicubic);
        let mut s = F::new(0.0);
        for qy in 0..taps {
            let yy = tap_index::<F>(sy, ih, qy, cfg.bicubic);
            let wy = tap_weight::<F>(sy, qy, cfg.bicubic);
            for qx in 0..taps {
                let xx = tap_index::<F>(sx, iw, qx, cfg.bicubic);
                let wx = tap_weight::<F>(sx, qx, cfg.bicubic);
                s += wy * wx * load::<F>(arena, weights, base + yy * iw + xx, cfg.in_arena);
            }
        }
        let out = meta[ResizeParams::OUT_OFF] as usize;
        arena[out + o] = s;
    }
}
