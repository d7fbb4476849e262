//! The metadata block of every cube kernel, as one typed struct per kernel family. A launch
//! binds a `u32` block (sizes, offsets in element units, strides) that the compiler builds
//! with the struct's `pack`; the kernel reads it at the slots declared here, next to the
//! struct, so the order of the slots is written once for both sides.
//!
//! Fixed blocks ([`fixed_params!`]) get one constant per field, in declaration order. Blocks
//! whose length depends on a rank (copies, fused regions, matmul, reduce) get `*_at`
//! functions of that rank, which the kernels evaluate at expansion time; `pack` writes the
//! fields at those same positions (checked by this module's tests).

/// A size or offset as a metadata word: the cube kernels index in 32 bits.
pub fn word(x: usize) -> Result<u32, String> {
    u32::try_from(x).map_err(|_| format!("size {x} exceeds the cube kernels' 32-bit indexing"))
}

fn words(xs: &[usize]) -> Result<Vec<u32>, String> {
    xs.iter().map(|&x| word(x)).collect()
}

/// Slot constants 0, 1, 2, ... in order.
macro_rules! slots {
    ($i:expr;) => {};
    ($i:expr; $slot:ident $(, $rest:ident)*) => {
        #[doc = concat!("The slot of `", stringify!($slot), "`.")]
        pub const $slot: usize = $i;
        slots!($i + 1; $($rest),*);
    };
}

/// A block of fixed length: each field is one word, at the slot constant named beside it.
macro_rules! fixed_params {
    ($(#[$m:meta])* pub struct $name:ident { $($(#[$fm:meta])* $field:ident => $slot:ident),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Debug, Default, PartialEq, Eq)]
        pub struct $name {
            $($(#[$fm])* pub $field: usize,)+
        }

        impl $name {
            slots!(0; $($slot),+);
            /// Words in the block.
            pub const LEN: usize = [$(stringify!($slot)),+].len();

            /// The metadata block: the fields in declaration order.
            pub fn pack(&self) -> Result<Vec<u32>, String> {
                Ok(vec![$(word(self.$field)?),+])
            }
        }
    };
}

/// An operand read through strides: its base offset and one stride per axis of the shape it
/// is indexed by (0 where it broadcasts).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Strided {
    pub off: usize,
    pub strides: Vec<usize>,
}

impl Strided {
    fn pack(&self, b: &mut Vec<u32>) -> Result<(), String> {
        b.push(word(self.off)?);
        b.extend(words(&self.strides)?);
        Ok(())
    }
}

/// [`super::copy`]: `n` elements of `shape` from `src` to `dst` (both strided over `shape`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CopyParams {
    pub shape: Vec<usize>,
    pub src: Strided,
    pub dst: Strided,
}

impl CopyParams {
    /// Elements (the product of the shape).
    pub const N: usize = 0;
    /// The shape, `rank` words.
    pub const SHAPE: usize = 1;

    /// The source's (offset, strides).
    pub const fn src_at(rank: usize) -> usize {
        1 + rank
    }

    /// The destination's (offset, strides).
    pub const fn dst_at(rank: usize) -> usize {
        2 + 2 * rank
    }

    /// The metadata block.
    pub fn pack(&self) -> Result<Vec<u32>, String> {
        let mut b = vec![word(self.shape.iter().product())?];
        b.extend(words(&self.shape)?);
        self.src.pack(&mut b)?;
        self.dst.pack(&mut b)?;
        Ok(b)
    }
}

/// [`super::fused`]: a region over the output `shape`, each input strided over it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FusedParams {
    pub out_off: usize,
    pub shape: Vec<usize>,
    pub inputs: Vec<Strided>,
}

impl FusedParams {
    /// Output elements (the product of the shape).
    pub const N: usize = 0;
    pub const OUT_OFF: usize = 1;
    /// The output shape, `rank` words.
    pub const SHAPE: usize = 2;

    /// Input `k`'s (offset, strides).
    pub const fn input_at(rank: usize, k: usize) -> usize {
        2 + rank + k * (rank + 1)
    }

    /// The metadata block.
    pub fn pack(&self) -> Result<Vec<u32>, String> {
        let mut b = vec![word(self.shape.iter().product())?, word(self.out_off)?];
        b.extend(words(&self.shape)?);
        for i in &self.inputs {
            i.pack(&mut b)?;
        }
        Ok(b)
    }
}

/// [`super::matmul`]: `[batch.., m, k] @ [batch.., k, n]` (or `[.., n, k]` transposed) into
/// the output `shape`; `a` and `b` carry one stride per batch axis of the output (in
/// elements, 0 where the operand broadcasts), the epilogue inputs one per output axis.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MatmulParams {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub out_off: usize,
    pub shape: Vec<usize>,
    pub a: Strided,
    pub b: Strided,
    pub epilogue: Vec<Strided>,
}

impl MatmulParams {
    pub const M: usize = 0;
    pub const N: usize = 1;
    pub const K: usize = 2;
    pub const OUT_OFF: usize = 3;
    /// The output shape, `rank` words.
    pub const SHAPE: usize = 4;

    /// `a`'s (offset, batch strides).
    pub const fn a_at(rank: usize) -> usize {
        4 + rank
    }

    /// `b`'s (offset, batch strides).
    pub const fn b_at(rank: usize) -> usize {
        3 + 2 * rank
    }

    /// Epilogue input `j`'s (offset, strides).
    pub const fn epilogue_at(rank: usize, j: usize) -> usize {
        4 + rank + 2 * (rank - 1) + j * (rank + 1)
    }

    /// The metadata block.
    pub fn pack(&self) -> Result<Vec<u32>, String> {
        let mut b = words(&[self.m, self.n, self.k, self.out_off])?;
        b.extend(words(&self.shape)?);
        self.a.pack(&mut b)?;
        self.b.pack(&mut b)?;
        for e in &self.epilogue {
            e.pack(&mut b)?;
        }
        Ok(b)
    }
}

/// One axis of a reduction: its extent and its stride in the input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Axis {
    pub len: usize,
    pub stride: usize,
}

/// [`super::reduce::reduce`]: output element `o` is the kept axes' position, folded over the
/// reduced axes (each list at least one axis: a size-1 axis of stride 0 pads an empty one).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReduceParams {
    pub out_off: usize,
    pub x_off: usize,
    pub kept: Vec<Axis>,
    pub reduced: Vec<Axis>,
}

impl ReduceParams {
    /// Output elements (the product of the kept extents).
    pub const N_OUT: usize = 0;
    /// Elements folded into each (the product of the reduced extents).
    pub const REDUCED: usize = 1;
    pub const OUT_OFF: usize = 2;
    /// The kept extents, `kept_rank` words.
    pub const KEPT_SHAPE: usize = 3;

    /// x's (offset, kept strides).
    pub const fn x_at(kept_rank: usize) -> usize {
        3 + kept_rank
    }

    /// The reduced extents.
    pub const fn reduced_shape_at(kept_rank: usize) -> usize {
        4 + 2 * kept_rank
    }

    /// (0, reduced strides): the offset of reduced element `j` from the first.
    pub const fn reduced_at(kept_rank: usize, reduced_rank: usize) -> usize {
        4 + 2 * kept_rank + reduced_rank
    }

    /// The metadata block.
    pub fn pack(&self) -> Result<Vec<u32>, String> {
        let len = |a: &[Axis]| a.iter().map(|x| x.len).collect::<Vec<_>>();
        let stride = |a: &[Axis]| a.iter().map(|x| x.stride).collect::<Vec<_>>();
        let (kept, reduced) = (len(&self.kept), len(&self.reduced));
        let mut b = words(&[kept.iter().product(), reduced.iter().product(), self.out_off])?;
        b.extend(words(&kept)?);
        Strided { off: self.x_off, strides: stride(&self.kept) }.pack(&mut b)?;
        b.extend(words(&reduced)?);
        Strided { off: 0, strides: stride(&self.reduced) }.pack(&mut b)?;
        Ok(b)
    }
}

fixed_params! {
    /// [`super::norm`]: layer norm, RMS norm or softmax over the last axis of `rows` rows.
    pub struct NormParams {
        rows => ROWS,
        /// The row length.
        d => D,
        x_off => X_OFF,
        w_off => W_OFF,
        b_off => B_OFF,
        out_off => OUT_OFF,
    }
}

fixed_params! {
    /// [`super::residual::residual_norm`]: `rows` rows of `d`, the output's halves `rows_pad`
    /// rows apart (`w_post_off` unused without a post-norm).
    pub struct ResidualNormParams {
        rows => ROWS,
        rows_pad => ROWS_PAD,
        d => D,
        x_off => X_OFF,
        o_off => O_OFF,
        w_post_off => W_POST_OFF,
        w_pre_off => W_PRE_OFF,
        out_off => OUT_OFF,
    }
}

fixed_params! {
    /// [`super::attention`]: q `[batch, sq, hq, d]`, k and v `[batch, sk, hkv, d|dv]`.
    pub struct AttentionParams {
        sq => SQ,
        sk => SK,
        hq => HQ,
        hkv => HKV,
        q_off => Q_OFF,
        k_off => K_OFF,
        v_off => V_OFF,
        out_off => OUT_OFF,
        /// The additive mask `[batch, sq, sk]` (unused by the other masks).
        mask_off => MASK_OFF,
        /// The position of query 0 among the keys (causal and sliding masks).
        q_offset => Q_OFFSET,
        window => WINDOW,
        /// A position mask's operands: query 0's key index `[1]`, `keep [batch, sk]` and
        /// `prefix [batch]` (0 where the mask has none).
        start_off => START_OFF,
        keep_off => KEEP_OFF,
        prefix_off => PREFIX_OFF,
    }
}

fixed_params! {
    /// [`super::resize`]: the last two axes `[ih, iw]` resampled to `[oh, ow]`.
    pub struct ResizeParams {
        /// Output elements.
        n => N,
        ih => IH,
        iw => IW,
        oh => OH,
        ow => OW,
        x_off => X_OFF,
        out_off => OUT_OFF,
    }
}

fixed_params! {
    /// One unit per line along an axis of stride `inner` (`[outer, len, inner]`):
    /// [`super::reduce::softmax_axis`] and [`super::index::cumsum`].
    pub struct LineParams {
        /// `outer * inner`.
        lines => LINES,
        len => LEN_AXIS,
        inner => INNER,
        x_off => X_OFF,
        out_off => OUT_OFF,
    }
}

fixed_params! {
    /// [`super::reduce::token_log_prob`]: logits `[rows, v]`, ids `[rows]`, out `[rows]`.
    pub struct TokenParams {
        rows => ROWS,
        v => V,
        x_off => X_OFF,
        idx_off => IDX_OFF,
        out_off => OUT_OFF,
    }
}

fixed_params! {
    /// [`super::index::cast`].
    pub struct CastParams {
        n => N,
        x_off => X_OFF,
        out_off => OUT_OFF,
    }
}

fixed_params! {
    /// [`super::index::iota`]: the output `[outer, len, inner]`, counting along `len`.
    pub struct IotaParams {
        n => N,
        len => LEN_AXIS,
        inner => INNER,
        out_off => OUT_OFF,
    }
}

fixed_params! {
    /// [`super::index::gather`] (output `[outer, rows, inner]` from x `[outer, len, inner]`)
    /// and [`super::index::write_rows`] (x `[outer, rows, inner]` into the output `[outer,
    /// len, inner]`).
    pub struct GatherParams {
        /// Units: output elements (gather) or x's elements (write_rows).
        n => N,
        /// The extent of the indexed (gather) or written (write_rows) axis.
        rows => ROWS,
        inner => INNER,
        /// The extent of the axis indexed into.
        len => LEN_AXIS,
        x_off => X_OFF,
        idx_off => IDX_OFF,
        out_off => OUT_OFF,
    }
}

fixed_params! {
    /// [`super::index::scatter_add`]: the output `[outer, len, inner]`, the index and the
    /// source `[outer, idx_len, inner]`.
    pub struct ScatterParams {
        n => N,
        len => LEN_AXIS,
        inner => INNER,
        idx_len => IDX_LEN,
        base_off => BASE_OFF,
        idx_off => IDX_OFF,
        src_off => SRC_OFF,
        out_off => OUT_OFF,
    }
}

fixed_params! {
    /// [`super::index::topk`]: `k` of each row of `d`.
    pub struct TopkParams {
        /// `rows * d`.
        n => N,
        d => D,
        k => K,
        x_off => X_OFF,
        out_off => OUT_OFF,
    }
}

fixed_params! {
    /// [`super::index::moe_dispatch`]: x `[tokens, d]` into `[rows, d]` by `slot [tokens, k]`.
    pub struct MoeDispatchParams {
        /// `rows * d`.
        n => N,
        d => D,
        /// `tokens * k`.
        assignments => ASSIGNMENTS,
        k => K,
        x_off => X_OFF,
        slot_off => SLOT_OFF,
        out_off => OUT_OFF,
    }
}

fixed_params! {
    /// [`super::index::moe_combine`]: y `[rows, d]` back to `[tokens, d]`, weighted by `w
    /// [tokens, k]`.
    pub struct MoeCombineParams {
        /// `tokens * d`.
        n => N,
        d => D,
        k => K,
        y_off => Y_OFF,
        slot_off => SLOT_OFF,
        w_off => W_OFF,
        out_off => OUT_OFF,
    }
}

/// The block of a launch running `parts` (at least two) as independent parts of one kernel:
/// `parts.len()` words, each the start of a part's block within this block, then the blocks
/// (read by the kernels through [`super::part_base`]).
pub fn multi(parts: &[&[u32]]) -> Result<Vec<u32>, String> {
    let mut b = vec![0u32; parts.len()];
    for (i, p) in parts.iter().enumerate() {
        b[i] = word(b.len())?;
        b.extend_from_slice(p);
    }
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_multi_block_starts_with_each_part_s_start() {
        let b = multi(&[&[7, 8, 9], &[5]]).unwrap();
        assert_eq!(b, [2, 5, 7, 8, 9, 5]);
    }

    fn strided(off: usize, rank: usize) -> Strided {
        Strided { off, strides: (0..rank).map(|a| off + 1 + a).collect() }
    }

    /// `block[at..]` holds the operand's offset, then its strides.
    fn holds(block: &[u32], at: usize, s: &Strided) {
        assert_eq!(block[at] as usize, s.off);
        let got: Vec<usize> = block[at + 1..at + 1 + s.strides.len()].iter().map(|&w| w as usize).collect();
        assert_eq!(got, s.strides);
    }

    #[test]
    fn variable_blocks_are_packed_where_the_kernels_read_them() {
        for rank in 1..5 {
            let shape: Vec<usize> = (2..2 + rank).collect();
            let n: usize = shape.iter().product();
            let c = CopyParams { shape: shape.clone(), src: strided(100, rank), dst: strided(200, rank) };
            let b = c.pack().unwrap();
            assert_eq!((b[CopyParams::N] as usize, b[CopyParams::SHAPE] as usize), (n, 2));
            holds(&b, CopyParams::src_at(rank), &c.src);
            holds(&b, CopyParams::dst_at(rank), &c.dst);
            assert_eq!(b.len(), CopyParams::dst_at(rank) + 1 + rank);

            let f = FusedParams { out_off: 7, shape: shape.clone(), inputs: (0..3).map(|k| strided(300 + 100 * k, rank)).collect() };
            let b = f.pack().unwrap();
            assert_eq!((b[FusedParams::N] as usize, b[FusedParams::OUT_OFF], b[FusedParams::SHAPE] as usize), (n, 7, 2));
            for (k, i) in f.inputs.iter().enumerate() {
                holds(&b, FusedParams::input_at(rank, k), i);
            }
            assert_eq!(b.len(), FusedParams::input_at(rank, 3));
        }
        for rank in 2..6 {
            let m = MatmulParams {
                m: 3,
                n: 4,
                k: 5,
                out_off: 6,
                shape: (1..=rank).collect(),
                a: strided(100, rank - 2),
                b: strided(200, rank - 2),
                epilogue: (0..2).map(|j| strided(300 + 100 * j, rank)).collect(),
            };
            let b = m.pack().unwrap();
            assert_eq!([b[MatmulParams::M], b[MatmulParams::N], b[MatmulParams::K], b[MatmulParams::OUT_OFF]], [3, 4, 5, 6]);
            assert_eq!(b[MatmulParams::SHAPE + rank - 1] as usize, rank);
            holds(&b, MatmulParams::a_at(rank), &m.a);
            holds(&b, MatmulParams::b_at(rank), &m.b);
            for (j, e) in m.epilogue.iter().enumerate() {
                holds(&b, MatmulParams::epilogue_at(rank, j), e);
            }
            assert_eq!(b.len(), MatmulParams::epilogue_at(rank, 2));
        }
    }

    #[test]
    fn reduce_blocks_are_packed_where_the_kernel_reads_them() {
        let ax = |len, stride| Axis { len, stride };
        let r = ReduceParams { out_off: 9, x_off: 11, kept: vec![ax(2, 12), ax(3, 1)], reduced: vec![ax(4, 3)] };
        let b = r.pack().unwrap();
        assert_eq!([b[ReduceParams::N_OUT], b[ReduceParams::REDUCED], b[ReduceParams::OUT_OFF]], [6, 4, 9]);
        assert_eq!(&b[ReduceParams::KEPT_SHAPE..][..2], &[2, 3]);
        holds(&b, ReduceParams::x_at(2), &Strided { off: 11, strides: vec![12, 1] });
        assert_eq!(b[ReduceParams::reduced_shape_at(2)], 4);
        holds(&b, ReduceParams::reduced_at(2, 1), &Strided { off: 0, strides: vec![3] });
        assert_eq!(b.len(), ReduceParams::reduced_at(2, 1) + 2);
    }

    #[test]
    fn fixed_blocks_follow_the_declaration() {
        let a = AttentionParams { sq: 1, sk: 2, window: 11, ..Default::default() };
        let b = a.pack().unwrap();
        assert_eq!(b.len(), AttentionParams::LEN);
        assert_eq!((b[AttentionParams::SQ], b[AttentionParams::SK], b[AttentionParams::WINDOW]), (1, 2, 11));
        assert_eq!(AttentionParams::WINDOW, 10);
        assert_eq!((GatherParams::N, GatherParams::OUT_OFF, GatherParams::LEN), (0, 6, 7));
    }

    #[test]
    fn a_size_beyond_32_bits_is_an_error() {
        let e = CastParams { n: 1 << 33, ..Default::default() }.pack().unwrap_err();
        assert!(e.contains("32-bit"), "{e}");
    }
}
