//! The index and axis ops (kernels in `index.cu`): cumsum, top-k, take-along-axis,
//! scatter-add, softmax over an axis other than the last, resize; and the operands of a
//! matmul whose batch axes broadcast partially, copied to the full batch in the scratch
//! region so that one strided-batch GEMM (with aligned pointers) does the rest.

use super::{al, copy_launch, float_suffix, grid1, index_suffix, launch, off_of, Layout, Work};
use crate::geometry::{contiguous, MatmulGeometry, Split};
use kiln_graph::program::Step;
use kiln_graph::{DType, Op, ResizeMode, TensorType};
use kiln_kernels::cuda::{self as kc, AlongParams, LineParams, ResizeParams, SampleParams, TopkParams};

/// A shape as `[outer, len, inner]` around `axis`, as the kernels' parameters hold it.
fn split(shape: &[usize], axis: usize) -> (i64, i64, i64) {
    let s = Split::at(shape, axis);
    (s.outer as i64, s.len as i64, s.inner as i64)
}

/// One block per line (the scan's launch), as many as the grid allows; blocks stride.
fn blocks(lines: usize) -> (u32, u32, u32) {
    (lines.clamp(1, 65535 * 8) as u32, 1, 1)
}

/// The kernel of an index or axis op (softmax: over an axis other than the last).
pub(crate) fn kernel_for(op: &Op, inputs: &[TensorType], out: &TensorType) -> Result<String, String> {
    Ok(match op {
        // Every dtype has a sum (`bool` sums to "any", `u8` and `i32` wrap).
        Op::CumSum { .. } => format!("cumsum_{}", out.dtype.name()),
        Op::TopK { .. } => match inputs[0].dtype {
            DType::Bool => "topk_u8".to_string(),
            d => format!("topk_{}", d.name()),
        },
        Op::TakeAlongAxis { .. } => format!("take_along_b{}_{}", out.dtype.size(), index_suffix(inputs[1].dtype)?),
        Op::ScatterAdd { .. } => format!("scatter_add_{}_{}", out.dtype.name(), index_suffix(inputs[1].dtype)?),
        Op::Softmax { .. } => format!("softmax_axis_{}", float_suffix(out.dtype)?),
        Op::Resize { .. } => format!("resize_{}", float_suffix(out.dtype)?),
        Op::SampleToken if inputs[0].dtype == DType::F32 => "sample_token_f32".to_string(),
        Op::LogSoftmax if inputs[0].dtype == DType::F32 => "log_softmax_f32".to_string(),
        Op::TokenLogProb if inputs[0].dtype == DType::F32 => format!("token_log_prob_f32_{}", index_suffix(inputs[1].dtype)?),
        other => return Err(format!("{} is not an index op", other.name())),
    })
}

/// Lowers an index or axis op; `ins` and `out` are the operands' offsets in the allocation.
pub(super) fn lower(s: &Step, l: &Layout, ins: &[u64], out: u64) -> Result<Vec<Work>, String> {
    let types: Vec<TensorType> = s.inputs.iter().map(|o| o.ty.clone()).collect();
    let name = kernel_for(&s.op, &types, &s.output.ty)?;
    let x = &s.inputs[0].ty;
    let n = s.output.ty.numel();
    let err = l.error_flag as u64;
    Ok(match &s.op {
        Op::CumSum { axis, exclusive } => {
            let (outer, len, inner) = split(&x.shape, *axis);
            let p = LineParams { x: ins[0], out, outer, len, inner, exclusive: *exclusive as i32, pad: 0 };
            let relocs = [off_of(&p, &p.x), off_of(&p, &p.out)];
            vec![launch("index", name, blocks((outer * inner) as usize), kc::BLOCK, 0, &p, &relocs)]
        }
        Op::Softmax { axis } => {
            let (outer, len, inner) = split(&x.shape, *axis);
            let p = LineParams { x: ins[0], out, outer, len, inner, ..Default::default() };
            let relocs = [off_of(&p, &p.x), off_of(&p, &p.out)];
            vec![launch("index", name, grid1((outer * inner) as usize), kc::BLOCK, 0, &p, &relocs)]
        }
        Op::TopK { k } => {
            let d = *x.shape.last().ok_or("top-k of a scalar")?;
            let p = TopkParams { x: ins[0], out, rows: (x.numel() / d.max(1)) as i64, d: d as i64, k: *k as i64 };
            let relocs = [off_of(&p, &p.x), off_of(&p, &p.out)];
            vec![launch("index", name, grid1(x.numel()), kc::BLOCK, 0, &p, &relocs)]
        }
        Op::TakeAlongAxis { axis } | Op::ScatterAdd { axis } => {
            let (outer, len, inner) = split(&x.shape, *axis);
            let scatter = matches!(s.op, Op::ScatterAdd { .. });
            let p = AlongParams {
                x: ins[0],
                idx: ins[1],
                src: if scatter { ins[2] } else { 0 },
                out,
                err,
                outer,
                len,
                ilen: s.inputs[1].ty.shape[*axis] as i64,
                inner,
            };
            let mut relocs = vec![off_of(&p, &p.x), off_of(&p, &p.idx), off_of(&p, &p.out), off_of(&p, &p.err)];
            if scatter {
                relocs.push(off_of(&p, &p.src));
            }
            vec![launch("index", name, grid1(n), kc::BLOCK, 0, &p, &relocs)]
        }
        Op::Resize { size, mode } => {
            let r = x.rank();
            let (ih, iw) = (x.shape[r - 2], x.shape[r - 1]);
            if ih * iw == 0 && n > 0 {
                return Err(format!("resize of an empty image {x} to {size:?}"));
            }
            let p = ResizeParams {
                x: ins[0],
                out,
                planes: x.shape[..r - 2].iter().product::<usize>() as i64,
                ih: ih as i64,
                iw: iw as i64,
                oh: size[0] as i64,
                ow: size[1] as i64,
                cubic: (*mode == ResizeMode::Bicubic) as i32,
                pad: 0,
            };
            let relocs = [off_of(&p, &p.x), off_of(&p, &p.out)];
            vec![launch("index", name, grid1(n), kc::BLOCK, 0, &p, &relocs)]
        }
        Op::LogSoftmax => {
            let v = *x.shape.last().ok_or("log-softmax of a scalar")?;
            let rows = x.numel() / v.max(1);
            let p = LineParams { x: ins[0], out, outer: rows as i64, len: v as i64, inner: 1, ..Default::default() };
            let relocs = [off_of(&p, &p.x), off_of(&p, &p.out)];
            vec![launch("index", name, blocks(rows), kc::BLOCK, 0, &p, &relocs)]
        }
        Op::TokenLogProb => {
            let [rows, v] = x.shape[..] else { return Err(format!("token log-probabilities of {x}: expected logits [R, V]")) };
            let p = AlongParams { x: ins[0], idx: ins[1], src: 0, out, err, outer: rows as i64, len: v as i64, ilen: 1, inner: 1 };
            let relocs = [off_of(&p, &p.x), off_of(&p, &p.idx), off_of(&p, &p.out), off_of(&p, &p.err)];
            vec![launch("index", name, blocks(rows), kc::BLOCK, 0, &p, &relocs)]
        }
        Op::SampleToken => {
            let v = *x.shape.last().ok_or("logits of a scalar")?;
            let rows = x.numel() / v.max(1);
            let p = SampleParams {
                x: ins[0],
                opts: ins[1],
                ctr: ins[2],
                streams: ins[3],
                out,
                err,
                scratch: l.scratch as u64,
                rows: rows as i64,
                v: v as i64,
            };
            let ptrs = [&p.x, &p.opts, &p.ctr, &p.streams, &p.out, &p.err, &p.scratch];
            let relocs: Vec<usize> = ptrs.iter().map(|f| off_of(&p, *f)).collect();
            vec![launch("index", name, blocks(rows), kc::BLOCK, 0, &p, &relocs)]
        }
        other => return Err(format!("{} is not an index op", other.name())),
    })
}

/// Bytes of scratch a selection step needs: top-p's order, an i32 per logit.
pub(super) fn sample_scratch(s: &Step) -> usize {
    match s.op {
        Op::SampleToken => al(4 * s.inputs[0].ty.numel()),
        _ => 0,
    }
}

/// The geometry of a matmul step (None for other steps).
fn matmul_geometry(s: &Step) -> Option<MatmulGeometry> {
    let Op::MatMul { .. } = s.op else { return None };
    Some(MatmulGeometry::new(&s.inputs[0].ty.shape, &s.inputs[1].ty.shape, &s.output.ty.shape))
}

/// Bytes of scratch a step needs to materialise its matmul operands whose batch axes
/// broadcast partially (0 for other steps): cuBLASLt's strided batches cannot read them.
pub(super) fn matmul_scratch(s: &Step) -> usize {
    let Some(g) = matmul_geometry(s) else { return 0 };
    g.partial().into_iter().map(|i| al(g.batch * s.inputs[i].ty.bytes() / g.lead[i].max(1))).sum()
}

/// The copies to run first, the operands' addresses and their batch extents.
type Operands = (Vec<Work>, Vec<u64>, [usize; 2]);

/// For a matmul whose batch axes broadcast partially, copies each such operand to the full
/// batch (`[batch, rows, cols]`, in the scratch region) and returns the copies, the
/// operands' addresses (`ins` with those replaced) and their batch extents (`batch` for a
/// copied one). Other matmuls come back unchanged with no copies.
pub(super) fn broadcast_operands(s: &Step, l: &Layout, g: &MatmulGeometry, mut ins: Vec<u64>) -> Result<Operands, String> {
    let mut leads = g.lead;
    let mut at = l.scratch;
    let mut copies = Vec::new();
    for i in g.partial() {
        let esize = s.inputs[i].ty.dtype.size();
        // Axes of extent 1 are dropped; the matrix is one contiguous axis.
        let (mut dims, mut src_st): (Vec<usize>, Vec<usize>) =
            g.batch_shape.iter().zip(&g.batch_strides[i]).filter(|(&d, _)| d > 1).map(|(&d, &s)| (d, s)).unzip();
        dims.push(g.mat[i]);
        src_st.push(1);
        copies.push(copy_launch(&dims, esize, ins[i], &src_st, at as u64, &contiguous(&dims))?);
        ins[i] = at as u64;
        leads[i] = g.batch;
        at += al(g.batch * g.mat[i] * esize);
    }
    if at > l.scratch + l.scratch_bytes {
        return Err(format!(
            "the matmul's broadcast operands need {} bytes of scratch; the layout has {}",
            at - l.scratch,
            l.scratch_bytes
        ));
    }
    Ok((copies, ins, leads))
}

#[cfg(test)]
mod tests {
    use super::super::tests::{arena, tt};
    use super::super::{layout, lower_step, Launch};
    use super::*;
    use kiln_graph::program::{Entry, Program};

    fn step(op: Op, ins: Vec<TensorType>, out: TensorType) -> Step {
        let mut at = 0;
        let inputs = ins
            .into_iter()
            .map(|t| {
                let o = arena(at, t);
                at += 4096;
                o
            })
            .collect();
        super::super::with_kernel(Step { node: 0, op, kernel: String::new(), inputs, output: arena(1 << 20, out) })
    }

    const LAYOUT: Layout = Layout {
        arena: 0,
        arena_bytes: 0,
        weights: Vec::new(),
        constants: Vec::new(),
        scratch: 1 << 24,
        scratch_bytes: 1 << 20,
        counters: 0,
        counters_bytes: 0,
        workspace: 0,
        error_flag: 1 << 26,
        total: 0,
        rotations: Vec::new(),
    };

    /// Lowers a step to its one kernel launch.
    fn one(s: &Step) -> Launch {
        let w = lower_step(s, &LAYOUT).unwrap();
        assert_eq!(w.len(), 1, "{w:?}");
        let Work::Kernel(k) = w.into_iter().next().unwrap() else { panic!() };
        assert_eq!(k.module, "index");
        assert!(kc::modules().iter().any(|m| m.name == "index" && m.kernels.iter().any(|x| x.name == k.kernel)), "{}", k.kernel);
        let kn = super::super::kernel_for(&s.op, &s.inputs.iter().map(|o| o.ty.clone()).collect::<Vec<_>>(), &s.output.ty).unwrap();
        assert_eq!(kn, k.kernel);
        k
    }

    fn params<T: Copy>(k: &Launch) -> T {
        assert_eq!(k.params.len(), std::mem::size_of::<T>());
        // SAFETY: the bytes were made from a T by `bytes_of`; read unaligned.
        unsafe { std::ptr::read_unaligned(k.params.as_ptr() as *const T) }
    }

    /// The values at the relocations, sorted.
    fn relocated(k: &Launch) -> Vec<u64> {
        let mut v: Vec<u64> = k.relocs.iter().map(|&r| u64::from_le_bytes(k.params[r..r + 8].try_into().unwrap())).collect();
        v.sort();
        v
    }

    #[test]
    fn cumsum_is_one_block_per_line() {
        let x = tt(DType::F32, &[2, 9, 4]);
        let k = one(&step(Op::CumSum { axis: 1, exclusive: true }, vec![x.clone()], x));
        assert_eq!(k.kernel, "cumsum_f32");
        assert_eq!((k.grid, k.block), ((8, 1, 1), kc::BLOCK));
        let p: LineParams = params(&k);
        assert_eq!((p.outer, p.len, p.inner, p.exclusive), (2, 9, 4, 1));
        assert_eq!(relocated(&k), [0, 1 << 20]);
        let b = tt(DType::Bool, &[3, 7]);
        assert_eq!(one(&step(Op::CumSum { axis: 0, exclusive: false }, vec![b.clone()], b)).kernel, "cumsum_bool");
    }

    #[test]
    fn softmax_over_a_middle_axis_is_strided_and_the_last_axis_keeps_its_kernel() {
        let x = tt(DType::BF16, &[3, 4, 5]);
        let k = one(&step(Op::Softmax { axis: 1 }, vec![x.clone()], x.clone()));
        assert_eq!(k.kernel, "softmax_axis_bf16");
        let p: LineParams = params(&k);
        assert_eq!((p.outer, p.len, p.inner), (3, 4, 5));
        assert_eq!(k.grid, (1, 1, 1));
        let k0 = one(&step(Op::Softmax { axis: 0 }, vec![x.clone()], x.clone()));
        let p: LineParams = params(&k0);
        assert_eq!((p.outer, p.len, p.inner), (1, 3, 20));
        let w = lower_step(&step(Op::Softmax { axis: 2 }, vec![x.clone()], x), &LAYOUT).unwrap();
        let Work::Kernel(last) = &w[0] else { panic!() };
        assert_eq!((last.module.as_str(), last.kernel.as_str()), ("norm", "softmax_bf16"));
    }

    #[test]
    fn topk_ranks_every_element_of_every_row() {
        let x = tt(DType::F32, &[3, 1000]);
        let k = one(&step(Op::TopK { k: 5 }, vec![x], tt(DType::I64, &[3, 5])));
        assert_eq!(k.kernel, "topk_f32");
        let p: TopkParams = params(&k);
        assert_eq!((p.rows, p.d, p.k), (3, 1000, 5));
        assert_eq!(k.grid, (12, 1, 1));
        assert_eq!(relocated(&k), [0, 1 << 20]);
        let b = tt(DType::Bool, &[4]);
        assert_eq!(one(&step(Op::TopK { k: 2 }, vec![b], tt(DType::I64, &[2]))).kernel, "topk_u8");
    }

    #[test]
    fn take_along_axis_and_scatter_add_report_bad_indices() {
        let x = tt(DType::F32, &[2, 5, 3]);
        let idx = tt(DType::I32, &[2, 7, 3]);
        let k = one(&step(Op::TakeAlongAxis { axis: 1 }, vec![x.clone(), idx.clone()], tt(DType::F32, &[2, 7, 3])));
        assert_eq!(k.kernel, "take_along_b4_i32");
        let p: AlongParams = params(&k);
        assert_eq!((p.outer, p.len, p.ilen, p.inner, p.src), (2, 5, 7, 3, 0));
        assert_eq!(relocated(&k), [0, 4096, 1 << 20, 1 << 26]);

        let src = tt(DType::F32, &[2, 7, 3]);
        let k = one(&step(Op::ScatterAdd { axis: 1 }, vec![x.clone(), idx.clone(), src], x.clone()));
        assert_eq!(k.kernel, "scatter_add_f32_i32");
        let p: AlongParams = params(&k);
        assert_eq!((p.outer, p.len, p.ilen, p.inner), (2, 5, 7, 3));
        assert_eq!(relocated(&k), [0, 4096, 8192, 1 << 20, 1 << 26]);
        assert_eq!(k.grid, (1, 1, 1), "one thread per output element: 30");

        let i = tt(DType::I64, &[3, 4]);
        let k = one(&step(Op::ScatterAdd { axis: 1 }, vec![i.clone(), i.clone(), i.clone()], i));
        assert_eq!(k.kernel, "scatter_add_i64_i64");
    }

    #[test]
    fn resize_takes_the_last_two_axes() {
        let x = tt(DType::F32, &[2, 3, 5, 6]);
        let out = tt(DType::F32, &[2, 3, 9, 400]);
        let k = one(&step(Op::Resize { size: [9, 400], mode: ResizeMode::Bicubic }, vec![x.clone()], out));
        assert_eq!(k.kernel, "resize_f32");
        let p: ResizeParams = params(&k);
        assert_eq!((p.planes, p.ih, p.iw, p.oh, p.ow, p.cubic), (6, 5, 6, 9, 400, 1));
        assert_eq!(k.grid, ((6 * 9 * 400usize).div_ceil(256) as u32, 1, 1));
        let k = one(&step(Op::Resize { size: [3, 11], mode: ResizeMode::Bilinear }, vec![x], tt(DType::F32, &[2, 3, 3, 11])));
        let p: ResizeParams = params(&k);
        assert_eq!(p.cubic, 0);
        assert!(kernel_for(&Op::Resize { size: [2, 2], mode: ResizeMode::Bilinear }, &[tt(DType::I32, &[2, 2])], &tt(DType::I32, &[2, 2]))
            .is_err());
    }

    fn matmul(a: &[usize], b: &[usize], out: &[usize]) -> Step {
        step(Op::MatMul { transpose_b: false, epilogue: None }, vec![tt(DType::F32, a), tt(DType::F32, b)], tt(DType::F32, out))
    }

    #[test]
    fn a_partially_broadcast_matmul_copies_its_operands_to_the_full_batch() {
        let s = matmul(&[2, 1, 5, 7], &[3, 7, 4], &[2, 3, 5, 4]);
        assert_eq!(matmul_scratch(&s), al(6 * 35 * 4) + al(6 * 28 * 4));
        let w = lower_step(&s, &LAYOUT).unwrap();
        assert_eq!(w.len(), 3, "{w:?}");
        let (Work::Kernel(ca), Work::Kernel(cb), Work::Gemm(g)) = (&w[0], &w[1], &w[2]) else { panic!("{w:?}") };
        // a [2, 1] -> [2, 3]: axis 0 strides one matrix, axis 1 repeats it.
        let pa: kc::CopyParams = params(ca);
        assert_eq!((pa.rank, &pa.dims[..3], &pa.src_st[..3], &pa.dst_st[..3]), (3, &[2, 3, 35][..], &[35, 0, 1][..], &[105, 35, 1][..]));
        assert_eq!((pa.src, pa.dst), (0, 1 << 24));
        let pb: kc::CopyParams = params(cb);
        assert_eq!((&pb.dims[..3], &pb.src_st[..3]), (&[2, 3, 28][..], &[0, 28, 1][..]));
        assert_eq!((pb.src, pb.dst), (4096, (1 << 24) + al(6 * 35 * 4) as u64));
        assert_eq!((g.m, g.n, g.k, g.batch, g.a_stride, g.b_stride), (5, 4, 7, 6, 35, 28));
        assert_eq!((g.a, g.b, g.c), (pa.dst, pb.dst, 1 << 20));

        // Only b broadcasts partially: a is already the whole batch.
        let s = matmul(&[3, 1, 33], &[3, 33, 3], &[3, 1, 3]);
        assert_eq!(lower_step(&s, &LAYOUT).unwrap().len(), 1);
        let s = matmul(&[3, 2, 1, 33], &[2, 33, 3], &[3, 2, 1, 3]);
        let w = lower_step(&s, &LAYOUT).unwrap();
        assert_eq!(w.len(), 2, "b alone is copied: {w:?}");
        let Work::Gemm(g) = &w[1] else { panic!() };
        assert_eq!((g.batch, g.a_stride, g.b_stride, g.a), (6, 33, 99, 0));
    }

    #[test]
    fn the_layout_reserves_the_matmul_scratch() {
        let s = matmul(&[2, 1, 5, 7], &[3, 7, 4], &[2, 3, 5, 4]);
        let e =
            Entry { name: "forward".into(), inputs: vec![], outputs: vec![], steps: vec![s], arena_bytes: 4096, plan: Default::default() };
        let p = Program {
            model: "t".into(),
            backend: "cuda".into(),
            source: String::new(),
            weights: vec![],
            constants: vec![],
            entries: vec![e],
            states: vec![],
            binaries: vec![],
            weight_sets: vec![],
            tuning: vec![],
        };
        let l = layout(&p).unwrap();
        assert!(l.scratch_bytes >= matmul_scratch(&p.entries[0].steps[0]));
        assert!(l.workspace >= l.scratch + l.scratch_bytes);
        lower_step(&p.entries[0].steps[0], &l).unwrap();
        // Too little scratch is an error, not a write past it.
        let small = Layout { scratch_bytes: 64, ..l };
        assert!(lower_step(&p.entries[0].steps[0], &small).is_err());
    }
}
