//! The cube lowering of the compute steps: matmuls (with an epilogue, or a GLU's two
//! products in one launch), norms and attention.

use super::{shape_of, Launch, Lower};
use crate::cube::expr::instrs;
use crate::geometry::{AttentionGeometry, ElementwiseGeometry, MatmulGeometry, RowGeometry};
use kiln_graph::program::Step;
use kiln_graph::{Attention, Expr, MaskKind};
use kiln_kernels::cube::params::{AttentionParams, MatmulParams, NormParams, ResidualNormParams, Strided};
use kiln_kernels::cube::residual::ResidualNormCfg;
use kiln_kernels::cube::{AttMask, AttentionCfg, GatedCfg, MatmulCfg, NormCfg, NormKind};

impl Lower<'_> {
    /// A matmul's parameters: `g`'s sizes and batch strides, step `s`'s output (`out` its
    /// shape), the operands at `a_off` and `b_off`, `epilogue` the epilogue's inputs.
    fn matmul_params(
        &self,
        s: &Step,
        g: &MatmulGeometry,
        out: &[usize],
        (a_off, b_off): (usize, usize),
        epilogue: Vec<Strided>,
    ) -> Result<MatmulParams, String> {
        let [a_st, b_st] = g.batch_strides.clone();
        Ok(MatmulParams {
            m: g.m,
            n: g.n,
            k: g.k,
            out_off: self.out_off(s)?,
            shape: out.to_vec(),
            a: Strided { off: a_off, strides: a_st },
            b: Strided { off: b_off, strides: b_st },
            epilogue,
        })
    }

    pub(super) fn matmul(&mut self, s: &Step, transpose_b: bool, epilogue: Option<&Expr>) -> Result<Launch, String> {
        let out = shape_of(&s.output);
        let g = MatmulGeometry::new(&s.inputs[0].ty.shape, &s.inputs[1].ty.shape, &out);
        let (a_in_arena, a_off) = self.place(&s.inputs[0])?;
        let (b_in_arena, b_off) = self.place(&s.inputs[1])?;
        let mut params = self.matmul_params(s, &g, &out, (a_off, b_off), vec![])?;
        let epi = match epilogue {
            Some(e) => {
                let shapes: Vec<&[usize]> = s.inputs[2..].iter().map(|o| o.ty.shape.as_slice()).collect();
                let eg = ElementwiseGeometry::new(&shapes, &out);
                let (srcs, inputs) = self.broadcast_inputs(&s.inputs[2..], &eg.strides)?;
                params.epilogue = inputs;
                let mut dtypes = vec![s.inputs[0].ty.dtype];
                dtypes.extend(s.inputs[2..].iter().map(|o| o.ty.dtype));
                Some((instrs(e, &dtypes)?, srcs))
            }
            None => None,
        };
        let (meta, len) = self.push(params.pack())?;
        let cfg = MatmulCfg { transpose_b, a_in_arena, b_in_arena, epilogue: epi, rank: out.len(), parts: 1, stores: vec![None] };
        Ok(Launch::MatMul { cfg, m: g.m, n: g.n, batch: g.batch, meta, len })
    }

    /// A row-wise normalisation over the last axis: inputs x and (for norms) weight and bias.
    pub(super) fn norm(&mut self, kind: NormKind, eps: f32, s: &Step) -> Result<Launch, String> {
        let g = RowGeometry::new(&shape_of(&s.output));
        let mut offs = [0usize; 3];
        let mut in_arena = [true; 3];
        for (j, o) in s.inputs.iter().enumerate().take(3) {
            (in_arena[j], offs[j]) = self.place(o)?;
        }
        let [x_off, w_off, b_off] = offs;
        let (meta, len) = self.push(NormParams { rows: g.rows, d: g.d, x_off, w_off, b_off, out_off: self.out_off(s)? }.pack())?;
        Ok(Launch::Norm { cfg: NormCfg { kind, eps_bits: eps.to_bits(), in_arena }, rows: g.rows, meta, len })
    }

    /// The residual junction between two RMS norms: one cube per output row (padding rows too).
    pub(super) fn residual_norm(&mut self, s: &Step, r: &kiln_graph::ResidualRmsNorm) -> Result<Launch, String> {
        let d = *s.inputs[0].ty.shape.last().ok_or("a scalar residual")?;
        let rows = s.inputs[0].ty.numel() / d.max(1);
        let mut offs = [0usize; 4];
        let mut in_arena = [true; 4];
        let w_pre = s.inputs.len() - 1;
        for (k, i) in [0, 1, if r.post { 2 } else { w_pre }, w_pre].into_iter().enumerate() {
            (in_arena[k], offs[k]) = self.place(&s.inputs[i])?;
        }
        let [x_off, o_off, w_post_off, w_pre_off] = offs;
        let p = ResidualNormParams { rows, rows_pad: r.rows_pad, d, x_off, o_off, w_post_off, w_pre_off, out_off: self.out_off(s)? };
        let (meta, len) = self.push(p.pack())?;
        let cfg = ResidualNormCfg { add_one: r.add_one, post: r.post, eps_bits: r.eps.to_bits(), in_arena };
        Ok(Launch::ResidualNorm { cfg, rows: r.rows_pad, meta, len })
    }

    pub(super) fn attention(&mut self, s: &Step, att: &Attention) -> Result<Launch, String> {
        let g = AttentionGeometry::new(&s.inputs[0].ty.shape, &s.inputs[1].ty.shape, &s.inputs[2].ty.shape);
        let mut offs = [0usize; 4];
        let mut in_arena = [true; 4];
        for (j, o) in s.inputs.iter().enumerate().take(3) {
            (in_arena[j], offs[j]) = self.place(o)?;
        }
        let [q_off, k_off, v_off, mut mask_off] = offs;
        let (mut start_off, mut keep_off, mut prefix_off) = (0, 0, 0);
        let (mask, q_offset, window) = match att.mask {
            MaskKind::None => (AttMask::None, 0, 0),
            MaskKind::Causal { q_offset } => (AttMask::Causal, q_offset, 0),
            MaskKind::SlidingWindow { q_offset, window } => (AttMask::Sliding, q_offset, window),
            MaskKind::Additive => {
                let (arena, off) = self.place(s.inputs.get(3).ok_or("an additive mask without its input")?)?;
                mask_off = off;
                (AttMask::Additive { in_arena: arena }, 0, 0)
            }
            MaskKind::Positions(pm) => {
                let operand = |i: usize| s.inputs.get(i).ok_or_else(|| format!("a position mask without its input {i}"));
                let (start, off) = self.src(operand(3)?)?;
                start_off = off;
                let keep = if pm.padding {
                    let (src, off) = self.src(operand(4)?)?;
                    keep_off = off;
                    Some(src)
                } else {
                    None
                };
                let prefix = if pm.prefix {
                    let (src, off) = self.src(operand(4 + usize::from(pm.padding))?)?;
                    prefix_off = off;
                    Some(src)
                } else {
                    None
                };
                (AttMask::Positions { window: pm.window.is_some(), start, keep, prefix }, 0, pm.window.unwrap_or(0))
            }
        };
        let (sq, sk, hq, hkv) = (g.sq, g.sk, g.hq, g.hkv);
        let out_off = self.out_off(s)?;
        let p =
            AttentionParams { sq, sk, hq, hkv, q_off, k_off, v_off, out_off, mask_off, q_offset, window, start_off, keep_off, prefix_off };
        let (meta, len) = self.push(p.pack())?;
        let cfg = AttentionCfg {
            d: g.d,
            dv: g.dv,
            scale_bits: att.scale.to_bits(),
            softcap_bits: att.softcap.map(f32::to_bits),
            mask,
            in_arena: [in_arena[0], in_arena[1], in_arena[2]],
        };
        Ok(Launch::Attention { cfg, sq, heads: hq, batch: g.batch, meta, len })
    }

    /// A GLU's gate and up products of `x [.., m, k]` by the stacked weights `[2, k, n]` (`[2,
    /// n, k]` with `transpose_b`) and the epilogue on both: one launch, the up weight read at
    /// the gate's offset plus `k * n`.
    pub(super) fn gated_matmul(&mut self, s: &Step, transpose_b: bool, epilogue: &Expr) -> Result<Launch, String> {
        let out = shape_of(&s.output);
        let w = &s.inputs[1].ty.shape;
        if w.len() != 3 || w[0] != 2 {
            return Err(format!("a gated matmul's weights are [2, k, n], not {:?}", w));
        }
        let g = MatmulGeometry::new(&s.inputs[0].ty.shape, &w[1..], &out);
        let (a_in_arena, a_off) = self.place(&s.inputs[0])?;
        let (b_in_arena, b_off) = self.place(&s.inputs[1])?;
        let shapes: Vec<&[usize]> = s.inputs[2..].iter().map(|o| o.ty.shape.as_slice()).collect();
        let eg = ElementwiseGeometry::new(&shapes, &out);
        let (srcs, inputs) = self.broadcast_inputs(&s.inputs[2..], &eg.strides)?;
        let mut dtypes = vec![s.inputs[0].ty.dtype; 2];
        dtypes.extend(s.inputs[2..].iter().map(|o| o.ty.dtype));
        let code = instrs(epilogue, &dtypes)?;
        let params = self.matmul_params(s, &g, &out, (a_off, b_off), inputs)?;
        let (meta, len) = self.push(params.pack())?;
        let cfg = GatedCfg { transpose_b, a_in_arena, b_in_arena, code, srcs, rank: out.len() };
        Ok(Launch::Gated { cfg, m: g.m, n: g.n, batch: g.batch, meta, len })
    }
}
