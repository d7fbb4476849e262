//! The matmul side of the lowering: which fused epilogues a GEMM applies itself (cuBLASLt's
//! bias and GELU epilogues, a residual read as its C operand with beta = 1), and the
//! small-M GEMV kernel (`kiln_kernels::cuda::gemv`) a GEMM can run as instead.

use super::lower::{bytes_of, off_of, Epilogue, Gemm, Launch};
use kiln_graph::program::Step;
use kiln_graph::{BinaryOp, DType, Expr, Instr, Op, TensorType, UnaryOp};
use kiln_kernels::cuda::gemv::{self, GemvParams};

/// An epilogue the GEMM applies itself: `acc (+ bias[n]) (then GELU-tanh)`, or
/// `acc (+ bias[n]) + residual[m, n]`. The indices name the matmul's extra inputs (its
/// inputs after `a` and `b`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpilogueKind {
    pub bias: Option<usize>,
    pub gelu: bool,
    pub residual: Option<usize>,
    /// The bias holds one row per batch of the product (`[G, 1, N]`: stacked projections'
    /// biases), so the GEMM steps it by `N` per batch.
    pub bias_batched: bool,
}

impl EpilogueKind {
    /// The name `kernel_for` appends (`cublaslt.gemm_bf16_tb+bias+residual`).
    pub fn name(&self) -> &'static str {
        match (self.bias.is_some(), self.gelu, self.residual.is_some()) {
            (true, false, false) => "bias",
            (false, true, false) => "gelu_tanh",
            (true, true, false) => "bias_gelu_tanh",
            (false, false, true) => "residual",
            (true, false, true) => "bias+residual",
            _ => "none",
        }
    }

    /// The GEMM's epilogue, given the device addresses of the extra inputs.
    pub fn epilogue(&self, extra: &[u64]) -> Epilogue {
        match (self.bias.map(|i| extra[i]), self.gelu, self.residual.map(|i| extra[i])) {
            (Some(b), false, None) => Epilogue::Bias(b),
            (None, true, None) => Epilogue::GeluTanh,
            (Some(b), true, None) => Epilogue::BiasGeluTanh(b),
            (None, false, Some(r)) => Epilogue::Residual(r),
            (Some(bias), false, Some(residual)) => Epilogue::BiasResidual { bias, residual },
            _ => Epilogue::None,
        }
    }
}

/// The fused region that applies a matmul's epilogue `e` cuBLASLt lacks, after the GEMM wrote
/// the product into the output (in the output's dtype `out`, from operands of `operands`),
/// with the dtypes of the region's inputs (the output, then the extra inputs). Where the
/// epilogue ends with a cast (a bf16 head's logits to f32), the GEMM writes its f32
/// accumulator unrounded and the region first rounds it to the operands' dtype, as a GEMM
/// writing that dtype does.
pub fn epilogue_region(e: &Expr, operands: DType, out: DType, extra: &[DType]) -> (Expr, Vec<DType>) {
    let mut ins = vec![out];
    ins.extend_from_slice(extra);
    if operands == out {
        return (e.clone(), ins);
    }
    let mut instrs = vec![Instr::Input(0)];
    instrs.extend(e.instrs.iter().map(|i| match *i {
        Instr::Input(0) => Instr::Cast(operands, 0),
        other => other.map_operands(|a| a + 1),
    }));
    (Expr { instrs }, ins)
}

/// Collects the leaves of the tree of additions rooted at `root`; false when the tree holds
/// anything else or an instruction is read twice.
fn sum_leaves(instrs: &[Instr], root: usize, leaves: &mut Vec<u16>, seen: &mut [bool]) -> bool {
    if root >= instrs.len() || seen[root] {
        return false;
    }
    seen[root] = true;
    match instrs[root] {
        Instr::Input(k) => {
            leaves.push(k);
            true
        }
        Instr::Binary(BinaryOp::Add, a, b) => {
            (a as usize) < root
                && (b as usize) < root
                && sum_leaves(instrs, a as usize, leaves, seen)
                && sum_leaves(instrs, b as usize, leaves, seen)
        }
        _ => false,
    }
}

/// Which epilogue a matmul's fused expression `e` is, if the GEMM can apply it: a sum of the
/// product (`Input(0)`) with a bias over the last axis and / or a residual of the output's
/// shape (`Input(k)` reads `extra[k - 1]`), in any order and association the fusion passes
/// emit; or GELU-tanh of the product or of product + bias. Every extra input must have the
/// output's dtype.
pub fn epilogue_kind(e: &Expr, extra: &[TensorType], out: &TensorType) -> Option<EpilogueKind> {
    let i = &e.instrs;
    let last = i.len().checked_sub(1)?;
    let (root, gelu) = match i[last] {
        Instr::Unary(UnaryOp::GeluTanh, x) if x as usize + 1 == last => (x as usize, true),
        _ => (last, false),
    };
    let (mut leaves, mut seen) = (Vec::new(), vec![false; i.len()]);
    // Every instruction up to the root is part of the tree, read once.
    if !sum_leaves(i, root, &mut leaves, &mut seen) || seen.iter().filter(|&&s| s).count() != root + 1 {
        return None;
    }
    if leaves.iter().filter(|&&k| k == 0).count() != 1 {
        return None;
    }
    let others: Vec<usize> = leaves.iter().filter(|&&k| k != 0).map(|&k| k as usize - 1).collect();
    if others.len() != extra.len() || others.iter().any(|&j| j >= extra.len()) || (others.len() == 2 && others[0] == others[1]) {
        return None;
    }
    if extra.iter().any(|t| t.dtype != out.dtype) {
        return None;
    }
    let n = *out.shape.last()?;
    let shared_bias = |j: usize| extra[j].numel() == n && extra[j].shape.last() == Some(&n);
    // One bias row per batch: `[.., 1, n]` with the output's batch axes (more than one batch).
    let r = out.rank();
    let batched_bias = |j: usize| {
        let t = &extra[j];
        r > 2 && t.rank() == r && t.shape[r - 2] == 1 && t.shape[r - 1] == n && t.shape[..r - 2] == out.shape[..r - 2] && t.numel() > n
    };
    let bias_like = |j: usize| shared_bias(j) || batched_bias(j);
    // Same element count as the output and broadcastable to it: the same layout.
    let full = |j: usize| extra[j].numel() == out.numel();
    let kind = |bias: Option<usize>, residual| Some(EpilogueKind { bias, gelu, residual, bias_batched: bias.is_some_and(batched_bias) });
    match (others.as_slice(), gelu) {
        ([], true) => kind(None, None),
        (&[j], _) if bias_like(j) => kind(Some(j), None),
        (&[j], false) if full(j) => kind(None, Some(j)),
        (&[p, q], false) if bias_like(p) && full(q) => kind(Some(p), Some(q)),
        (&[p, q], false) if bias_like(q) && full(p) => kind(Some(q), Some(p)),
        _ => None,
    }
}

/// The GEMV launch that computes `g` (a single `[m, k] x [n, k]^T` product with `m <= 8`,
/// 16-byte rows and bases), or `None` where only cuBLASLt applies.
pub fn gemv_launch(g: &Gemm) -> Option<Launch> {
    // A half product written as f32 (its epilogue then runs as a region): no epilogue here.
    let to_f32 = g.out_dtype != g.dtype;
    if to_f32 && (g.out_dtype != DType::F32 || g.dtype == DType::F32 || g.epilogue != Epilogue::None) {
        return None;
    }
    let suffix = match g.dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => return None,
    };
    if g.batch != 1 || !g.transpose_b || !g.a.is_multiple_of(16) || !g.b.is_multiple_of(16) {
        return None;
    }
    let plan = gemv::plan(suffix, g.m, g.n, g.k)?;
    let (flags, bias, res) = match g.epilogue {
        Epilogue::None => (0, 0, 0),
        Epilogue::Bias(b) => (gemv::BIAS, b, 0),
        Epilogue::GeluTanh => (gemv::GELU, 0, 0),
        Epilogue::BiasGeluTanh(b) => (gemv::BIAS | gemv::GELU, b, 0),
        Epilogue::Residual(r) => (gemv::RESIDUAL, 0, r),
        Epilogue::BiasResidual { bias, residual } => (gemv::BIAS | gemv::RESIDUAL, bias, residual),
    };
    let es = g.dtype.size() as u64;
    if !g.c.is_multiple_of(g.out_dtype.size() as u64) || !bias.is_multiple_of(es) || !res.is_multiple_of(es) {
        return None;
    }
    let p = GemvParams {
        a: g.a,
        b: g.b,
        out: g.c,
        bias,
        res,
        m: g.m as i32,
        n: g.n as i32,
        k: g.k as i32,
        flags,
        kchunks: plan.kchunks,
        pad: 0,
        b2: 0,
    };
    let mut relocs = vec![off_of(&p, &p.a), off_of(&p, &p.b), off_of(&p, &p.out)];
    if flags & gemv::BIAS != 0 {
        relocs.push(off_of(&p, &p.bias));
    }
    if flags & gemv::RESIDUAL != 0 {
        relocs.push(off_of(&p, &p.res));
    }
    Some(Launch {
        module: "gemv".into(),
        kernel: if to_f32 { format!("{}_to_f32", plan.kernel) } else { plan.kernel },
        grid: (plan.grid, 1, 1),
        block: plan.block,
        smem: 0,
        params: bytes_of(&p),
        relocs,
    })
}

/// Which product a gated matmul's epilogue puts under GELU-tanh, when the epilogue is exactly
/// `gelu_tanh(Input(i)) * Input(1 - i)` (either operand order): the GLU `gemv_glu_*` computes.
pub fn glu_gate(e: &Expr) -> Option<usize> {
    let i = &e.instrs;
    let (&Instr::Binary(BinaryOp::Mul, p, q), 4) = (i.last()?, i.len()) else { return None };
    let input = |j: u16| match i.get(j as usize) {
        Some(&Instr::Input(k)) if k < 2 => Some(k as usize),
        _ => None,
    };
    let gelu = |j: u16| match i.get(j as usize) {
        Some(&Instr::Unary(UnaryOp::GeluTanh, x)) => input(x),
        _ => None,
    };
    let (gate, up) = match (gelu(p), input(q), gelu(q), input(p)) {
        (Some(g), Some(u), _, _) | (_, _, Some(g), Some(u)) => (g, u),
        _ => return None,
    };
    (gate != up).then_some(gate)
}

/// The kernel of a gated matmul (`Op::GatedMatMul`) on cuda, or why there is none: kiln's
/// GEMV computing both products and the GLU (`gemv_glu_<t>`), for a half dtype, at most
/// [`gemv::MAX_M`] rows of 16-byte multiples, transposed weights and the exact GLU epilogue. It
/// is the only kernel for the op (no cuBLASLt GEMM applies a binary epilogue reading another
/// product), so the load runs it whatever `--cuda-gemv` says; the compile makes the op only
/// where this accepts it.
pub fn gated_kernel(transpose_b: bool, e: &Expr, inputs: &[TensorType], out: &TensorType) -> Result<String, String> {
    let (a, b) = (&inputs[0], &inputs[1]);
    let t = match a.dtype {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        other => return Err(format!("{other}: the GLU GEMV takes bf16 and f16")),
    };
    if b.dtype != a.dtype || out.dtype != a.dtype || inputs.len() != 2 || !transpose_b || glu_gate(e).is_none() {
        return Err("only gelu_tanh(gate) * up over [N, K] weights, in one dtype".into());
    }
    let (k, n) = (*a.shape.last().unwrap_or(&0), *out.shape.last().unwrap_or(&0));
    let m = a.numel() / k.max(1);
    gemv::plan(t, m, n, k).ok_or_else(|| format!("{m} rows of {k}: above the GEMV's {} rows or not 16-byte rows", gemv::MAX_M))?;
    Ok(format!("gemv_glu_{t}"))
}

/// The one launch of a gated matmul step (`ins`: its operands' addresses; `out` its output's).
pub fn gated_launch(s: &Step, ins: &[u64], out: u64) -> Result<Launch, String> {
    let Op::GatedMatMul { transpose_b, epilogue } = &s.op else { return Err(format!("{} is not a gated matmul", s.op.name())) };
    let types: Vec<TensorType> = s.inputs.iter().map(|o| o.ty.clone()).collect();
    let kernel = gated_kernel(*transpose_b, epilogue, &types, &s.output.ty)?;
    let gate = glu_gate(epilogue).unwrap_or(0) as u64;
    let (k, n) = (*types[0].shape.last().unwrap_or(&0), *s.output.ty.shape.last().unwrap_or(&0));
    let m = types[0].numel() / k.max(1);
    let plan = gemv::plan(&kernel["gemv_glu_".len()..], m, n, k).ok_or("no GEMV plan")?;
    let half = (n * k * types[0].dtype.size()) as u64;
    let (b, b2) = (ins[1] + gate * half, ins[1] + (1 - gate) * half);
    if [ins[0], b, b2, out].iter().any(|x| !x.is_multiple_of(16)) {
        return Err("the GLU GEMV's operands must start on 16-byte boundaries".into());
    }
    let p = GemvParams {
        a: ins[0],
        b,
        out,
        bias: 0,
        res: 0,
        m: m as i32,
        n: n as i32,
        k: k as i32,
        flags: gemv::GLU,
        kchunks: plan.kchunks,
        pad: 0,
        b2,
    };
    let relocs = vec![off_of(&p, &p.a), off_of(&p, &p.b), off_of(&p, &p.out), off_of(&p, &p.b2)];
    Ok(Launch { module: "gemv".into(), kernel, grid: (plan.grid, 1, 1), block: plan.block, smem: 0, params: bytes_of(&p), relocs })
}

#[cfg(test)]
mod tests {
    use super::super::lower::{kernel_for, lower_step, Layout, Work};
    use super::*;
    use kiln_graph::passes::Pipeline;
    use kiln_graph::program::{Operand, Slot, Step};
    use kiln_graph::{Graph, Op};

    fn tt(d: DType, s: &[usize]) -> TensorType {
        TensorType::new(d, s.to_vec())
    }

    /// The matmul epilogues the standard pipeline leaves in `g`, with their extra inputs'
    /// types and the output type.
    fn fused(g: &Graph) -> Vec<(Expr, Vec<TensorType>, TensorType)> {
        let opt = Pipeline::standard().run(g, None).unwrap();
        opt.nodes
            .iter()
            .filter_map(|n| match &n.op {
                Op::MatMul { epilogue: Some(e), .. } => {
                    Some((e.clone(), n.inputs[2..].iter().map(|&i| opt.ty(i).clone()).collect(), n.ty.clone()))
                }
                _ => None,
            })
            .collect()
    }

    /// A SigLIP-like block: `x + (ln(x) @ w^T + b)` with the residual on either side, and
    /// `x + y @ w^T` without a bias.
    fn block(dt: DType, rows: &[usize], residual_first: bool, bias: bool) -> Graph {
        let d = 96;
        let mut g = Graph::new();
        let mut shape = rows.to_vec();
        shape.push(d);
        let x = g.input("x", dt, &shape).unwrap();
        let s = g.weight("s", dt, &[d]).unwrap();
        let bb = g.weight("bb", dt, &[d]).unwrap();
        let w = g.weight("w", dt, &[d, d]).unwrap();
        let b = g.weight("b", dt, &[d]).unwrap();
        let h = g.layer_norm(x, s, bb, 1e-6).unwrap();
        let mut y = g.matmul(h, w, true).unwrap();
        if bias {
            y = g.add(y, b).unwrap();
        }
        let y = if residual_first { g.add(x, y).unwrap() } else { g.add(y, x).unwrap() };
        g.output("y", y);
        g
    }

    #[test]
    fn residuals_the_pipeline_emits_are_recognised() {
        for dt in [DType::BF16, DType::F32] {
            for rows in [&[2usize, 64][..], &[1, 1], &[5]] {
                for residual_first in [true, false] {
                    for bias in [true, false] {
                        let f = fused(&block(dt, rows, residual_first, bias));
                        assert_eq!(f.len(), 1, "{rows:?}");
                        let (e, extra, out) = &f[0];
                        let k = epilogue_kind(e, extra, out).unwrap_or_else(|| panic!("{e:?} {extra:?} not recognised"));
                        let m: usize = rows.iter().product();
                        if m == 1 && !bias {
                            // One row: the residual is indistinguishable from (and runs as) a bias.
                            assert_eq!(k.name(), "bias");
                        } else {
                            assert_eq!(k.name(), if bias { "bias+residual" } else { "residual" }, "{e:?}");
                        }
                        let mut ins = vec![tt(dt, &[m, 96]), tt(dt, &[96, 96])];
                        ins.extend(extra.iter().cloned());
                        let name = kernel_for(&Op::MatMul { transpose_b: true, epilogue: Some(e.clone()) }, &ins, out).unwrap();
                        assert!(name.starts_with("cublaslt.gemm_") && name.ends_with(k.name()), "{name}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_exact_instruction_patterns() {
        use Instr::{Binary, Input, Unary};
        let add = |a, b| Binary(BinaryOp::Add, a, b);
        let out = tt(DType::BF16, &[4, 8]);
        let (bias, res) = (tt(DType::BF16, &[8]), tt(DType::BF16, &[4, 8]));
        let k =
            |instrs: Vec<Instr>, extra: &[TensorType]| epilogue_kind(&Expr { instrs }, extra, &out).map(|k| (k.bias, k.gelu, k.residual));
        // (acc + b) + r, r + (acc + b), (acc + r) + b, acc + (b + r)
        assert_eq!(
            k(vec![Input(0), Input(1), add(0, 1), Input(2), add(2, 3)], &[bias.clone(), res.clone()]),
            Some((Some(0), false, Some(1)))
        );
        assert_eq!(
            k(vec![Input(0), Input(1), add(0, 1), Input(2), add(3, 2)], &[bias.clone(), res.clone()]),
            Some((Some(0), false, Some(1)))
        );
        assert_eq!(
            k(vec![Input(0), Input(1), add(1, 0), Input(2), add(2, 3)], &[res.clone(), bias.clone()]),
            Some((Some(1), false, Some(0)))
        );
        assert_eq!(
            k(vec![Input(1), Input(2), add(0, 1), Input(0), add(3, 2)], &[bias.clone(), res.clone()]),
            Some((Some(0), false, Some(1)))
        );
        assert_eq!(k(vec![Input(1), Input(0), add(0, 1)], std::slice::from_ref(&res)), Some((None, false, Some(0))));
        assert_eq!(
            k(vec![Input(0), Input(1), add(0, 1), Unary(UnaryOp::GeluTanh, 2)], std::slice::from_ref(&bias)),
            Some((Some(0), true, None))
        );
        assert_eq!(k(vec![Input(0), Unary(UnaryOp::GeluTanh, 0)], &[]), Some((None, true, None)));
        // Not a GEMM epilogue: a residual under GELU, the product twice, two residuals, a
        // residual of another dtype or shape, a multiplication.
        assert_eq!(k(vec![Input(0), Input(1), add(0, 1), Unary(UnaryOp::GeluTanh, 2)], std::slice::from_ref(&res)), None);
        assert_eq!(k(vec![Input(0), Input(1), add(0, 1), Input(0), add(2, 3)], std::slice::from_ref(&res)), None);
        assert_eq!(k(vec![Input(0), Input(1), add(0, 1), Input(2), add(2, 3)], &[res.clone(), res.clone()]), None);
        assert_eq!(k(vec![Input(0), Input(1), add(0, 1)], &[tt(DType::F32, &[4, 8])]), None);
        assert_eq!(k(vec![Input(0), Input(1), add(0, 1)], &[tt(DType::BF16, &[4, 1])]), None);
        assert_eq!(k(vec![Input(0), Input(1), Binary(BinaryOp::Mul, 0, 1)], std::slice::from_ref(&res)), None);
    }

    fn matmul_step(dt: DType, m: usize, n: usize, k: usize, epilogue: Option<Expr>, extra: &[TensorType]) -> Step {
        let op = |offset: usize, ty: TensorType| Operand { slot: Slot::Arena { offset, bytes: ty.bytes() }, ty };
        let mut inputs = vec![op(0, tt(dt, &[m, k])), op(1 << 20, tt(dt, &[n, k]))];
        for (i, t) in extra.iter().enumerate() {
            inputs.push(op((3 + i) << 20, t.clone()));
        }
        super::super::lower::with_kernel(Step {
            node: 0,
            op: Op::MatMul { transpose_b: true, epilogue },
            kernel: String::new(),
            inputs,
            output: op(2 << 20, tt(dt, &[m, n])),
        })
    }

    #[test]
    fn a_residual_gemm_carries_c_and_a_gemv() {
        let e = Expr {
            instrs: vec![
                Instr::Input(0),
                Instr::Input(1),
                Instr::Binary(BinaryOp::Add, 0, 1),
                Instr::Input(2),
                Instr::Binary(BinaryOp::Add, 3, 2),
            ],
        };
        let extra = [tt(DType::BF16, &[2304]), tt(DType::BF16, &[3, 2304])];
        let s = matmul_step(DType::BF16, 3, 2304, 9216, Some(e), &extra);
        let w = lower_step(&s, &Layout::default()).unwrap();
        assert_eq!(w.len(), 1, "no separate epilogue kernel");
        let Work::Gemm(g) = &w[0] else { panic!() };
        assert_eq!(g.epilogue, Epilogue::BiasResidual { bias: 3 << 20, residual: 4 << 20 });
        let l = g.gemv.as_ref().expect("a GEMV option");
        assert_eq!(l.kernel, "gemv_tb_bf16");
        assert_eq!(l.relocs.len(), 5);
        let read = |at: usize| u64::from_le_bytes(l.params[at..at + 8].try_into().unwrap());
        assert_eq!(l.relocs.iter().map(|&r| read(r)).collect::<Vec<_>>(), [0, 1 << 20, 2 << 20, 3 << 20, 4 << 20]);
        let p: GemvParams = unsafe { std::ptr::read_unaligned(l.params.as_ptr() as *const GemvParams) };
        assert_eq!((p.m, p.n, p.k, p.flags), (3, 2304, 9216, gemv::BIAS | gemv::RESIDUAL));
        assert_eq!(l.grid.0 as usize * 16, 2304);
    }

    /// A bf16 head whose epilogue soft-caps and ends with a cast to f32: cuBLASLt (or the
    /// GEMV's `_to_f32` kernel) writes the f32 accumulator, then one region rounds it to bf16.
    /// Without such an epilogue a bf16 product into f32 is refused.
    #[test]
    fn an_epilogue_ending_in_a_cast_runs_a_gemm_writing_f32() {
        let e = Expr { instrs: vec![Instr::Input(0), Instr::Unary(UnaryOp::Tanh, 0), Instr::Cast(DType::F32, 1)] };
        let mut s = matmul_step(DType::BF16, 1, 256, 64, Some(e.clone()), &[]);
        s.output.ty.dtype = DType::F32;
        s.output.slot = Slot::Arena { offset: 2 << 20, bytes: s.output.ty.bytes() };
        let s = super::super::lower::with_kernel(s);
        assert!(s.kernel.starts_with("cublaslt.gemm_bf16_tb_to_f32;fused_"), "{}", s.kernel);
        let w = lower_step(&s, &Layout::default()).unwrap();
        let [Work::Gemm(g), Work::Kernel(k)] = w.as_slice() else { panic!("{w:?}") };
        assert_eq!((g.dtype, g.out_dtype, g.c), (DType::BF16, DType::F32, 2 << 20));
        assert_eq!(g.gemv.as_ref().map(|l| l.kernel.as_str()), Some("gemv_tb_bf16_to_f32"));
        let (region, ins) = epilogue_region(&e, DType::BF16, DType::F32, &[]);
        assert_eq!(region.formula(), "cast[f32](tanh(cast[bf16]($0)))");
        assert_eq!(k.kernel, crate::cuda::fused_codegen::kernel_name(&region, &ins, DType::F32));
        assert!(s.kernel.ends_with(&k.kernel));
        let ins = [tt(DType::BF16, &[1, 64]), tt(DType::BF16, &[256, 64])];
        let plain = kernel_for(&Op::MatMul { transpose_b: true, epilogue: None }, &ins, &tt(DType::F32, &[1, 256]));
        assert!(plain.unwrap_err().contains("mixed dtypes"));
    }

    #[test]
    fn the_gemv_applies_to_small_aligned_transposed_products_only() {
        let gemv = |dt, m, n, k| {
            let w = lower_step(&matmul_step(dt, m, n, k, None, &[]), &Layout::default()).unwrap();
            let Work::Gemm(g) = &w[0] else { panic!() };
            g.gemv.as_ref().map(|l| l.kernel.clone())
        };
        for m in 1..=8 {
            assert_eq!(gemv(DType::BF16, m, 100, 72).as_deref(), Some("gemv_tb_bf16"));
            assert_eq!(gemv(DType::F16, m, 2304, 1000).as_deref(), Some("gemv_tb_f16"));
            assert_eq!(gemv(DType::F32, m, 7, 100), Some(format!("gemv_tb_f32_m{m}")));
        }
        assert_eq!(gemv(DType::BF16, 9, 100, 64), None, "M above 8");
        assert_eq!(gemv(DType::BF16, 1, 100, 100), None, "rows of 200 bytes");
        assert_eq!(gemv(DType::F32, 1, 100, 6), None, "rows of 24 bytes");
        let mut s = matmul_step(DType::BF16, 1, 64, 64, None, &[]);
        s.op = Op::MatMul { transpose_b: false, epilogue: None };
        s.inputs[1].ty = tt(DType::BF16, &[64, 64]);
        let w = lower_step(&super::super::lower::with_kernel(s), &Layout::default()).unwrap();
        assert!(matches!(&w[0], Work::Gemm(g) if g.gemv.is_none()), "[K, N] weights: cuBLASLt");
    }

    /// A stacked-projection step: `[1, m, k]` times `[g, n, k]^T` plus a `[g, 1, n]` bias.
    fn stacked_step(m: usize, g: usize) -> Step {
        let (n, k) = (128, 64);
        let e = Expr { instrs: vec![Instr::Input(0), Instr::Input(1), Instr::Binary(BinaryOp::Add, 0, 1)] };
        let mut s = matmul_step(DType::BF16, m, n, k, Some(e), &[tt(DType::BF16, &[g, 1, n])]);
        s.inputs[0].ty = tt(DType::BF16, &[1, m, k]);
        s.inputs[1].ty = tt(DType::BF16, &[g, n, k]);
        s.output.ty = tt(DType::BF16, &[g, m, n]);
        super::super::lower::with_kernel(s)
    }

    #[test]
    fn stacked_projections_are_one_gemm_with_a_bias_row_per_batch() {
        let s = stacked_step(16, 3);
        assert_eq!(s.kernel, "cublaslt.gemm_bf16_tb+bias");
        let w = lower_step(&s, &Layout::default()).unwrap();
        assert_eq!(w.len(), 1, "no separate epilogue kernel");
        let Work::Gemm(g) = &w[0] else { panic!() };
        assert_eq!((g.m, g.n, g.k, g.batch), (16, 128, 64, 3));
        assert_eq!((g.a_stride, g.b_stride, g.bias_stride), (0, 128 * 64, 128), "shared rows, stacked weights, a bias row each");
        assert_eq!(g.epilogue, Epilogue::Bias(3 << 20));
        // One row (decode): one `[1, 3 * 128]` product over the contiguous stack, which the
        // GEMV takes, its bias the stacked rows end to end.
        let w = lower_step(&stacked_step(1, 3), &Layout::default()).unwrap();
        let Work::Gemm(g) = &w[0] else { panic!() };
        assert_eq!((g.m, g.n, g.k, g.batch, g.bias_stride), (1, 3 * 128, 64, 1, 0));
        assert_eq!(g.gemv.as_ref().map(|l| l.kernel.as_str()), Some("gemv_tb_bf16"));
    }

    #[test]
    fn the_glu_epilogue_and_its_launch() {
        use Instr::{Binary, Input, Unary};
        let glu = |instrs: Vec<Instr>| glu_gate(&Expr { instrs });
        let mul = |a, b| Binary(BinaryOp::Mul, a, b);
        let gelu = |a| Unary(UnaryOp::GeluTanh, a);
        assert_eq!(glu(vec![Input(0), gelu(0), Input(1), mul(1, 2)]), Some(0));
        assert_eq!(glu(vec![Input(1), Input(0), gelu(1), mul(0, 2)]), Some(0));
        assert_eq!(glu(vec![Input(1), gelu(0), Input(0), mul(2, 1)]), Some(1));
        // Not the GLU: one product twice, another activation, a sum, an extra instruction.
        assert_eq!(glu(vec![Input(0), gelu(0), Input(0), mul(1, 2)]), None);
        assert_eq!(glu(vec![Input(0), Unary(UnaryOp::Silu, 0), Input(1), mul(1, 2)]), None);
        assert_eq!(glu(vec![Input(0), gelu(0), Input(1), Binary(BinaryOp::Add, 1, 2)]), None);
        assert_eq!(glu(vec![Input(0), gelu(0), Input(1), mul(1, 2), gelu(3)]), None);
        // The launch: gate rows at the stacked weight's second half here.
        let e = Expr { instrs: vec![Input(1), gelu(0), Input(0), mul(1, 2)] };
        let op = |offset: usize, ty: TensorType| Operand { slot: Slot::Arena { offset, bytes: ty.bytes() }, ty };
        let s = Step {
            node: 0,
            op: Op::GatedMatMul { transpose_b: true, epilogue: e.clone() },
            kernel: "gemv_glu_bf16".into(),
            inputs: vec![op(0, tt(DType::BF16, &[1, 64])), op(1 << 20, tt(DType::BF16, &[2, 96, 64]))],
            output: op(2 << 20, tt(DType::BF16, &[1, 96])),
        };
        let l = gated_launch(&s, &[0, 1 << 20], 2 << 20).unwrap();
        assert_eq!(l.kernel, "gemv_glu_bf16");
        // SAFETY: the launch's parameters are a GemvParams' bytes.
        let p: GemvParams = unsafe { std::ptr::read_unaligned(l.params.as_ptr() as *const GemvParams) };
        assert_eq!((p.m, p.n, p.k, p.flags), (1, 96, 64, gemv::GLU));
        assert_eq!((p.b, p.b2), ((1 << 20) + 96 * 64 * 2, 1 << 20));
        assert_eq!(l.relocs.len(), 4);
        // Nine rows, f32, or untransposed weights: no GLU GEMV.
        let ins = |d, m| vec![tt(d, &[m, 64]), tt(d, &[2, 96, 64])];
        assert!(gated_kernel(true, &e, &ins(DType::BF16, 9), &tt(DType::BF16, &[9, 96])).is_err());
        assert!(gated_kernel(true, &e, &ins(DType::F32, 1), &tt(DType::F32, &[1, 96])).is_err());
        assert!(gated_kernel(false, &e, &ins(DType::BF16, 1), &tt(DType::BF16, &[1, 96])).is_err());
        assert_eq!(gated_kernel(true, &e, &ins(DType::F16, 8), &tt(DType::F16, &[8, 96])).as_deref(), Ok("gemv_glu_f16"));
    }
}
