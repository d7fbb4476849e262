//! Weights packed at load for the AVX-512 GEMM (`sgemm512::PackedB`): which steps pack which
//! weight, the packing itself, shared across entries, and the gathers that read a packed
//! weight's rows from its panels (a tied embedding and LM head, held once).

use super::exec::Prepared;
use super::kernel::CpuKernel;
use kiln_graph::program::{Program, Slot, Step};
use kiln_graph::Op;
use kiln_kernels::cpu::sgemm512;
use std::sync::Arc;

/// Packed right-hand sides by (weight index, transposed), shared by every step and entry that
/// reads the same weight the same way (a prefill and a decode entry pack each weight once).
pub(crate) type PackCache = std::collections::HashMap<(u32, bool), Arc<Vec<sgemm512::PackedB>>>;

/// Packs a weight right-hand side once, when the AVX-512 kernel can use it: a 2-D weight, or
/// each matrix of a batched weight whose batch axes match the product's one to one (experts,
/// `[E, G*Cap, D] x [E, D, F]`) or whose left operand is shared (stacked projections, `[1, M, K]
/// x [G, N, K]`). Entries of one program share the packed copy through `cache`.
pub(crate) fn pack_weight<'w>(
    s: &Step,
    kernel: CpuKernel,
    tb: bool,
    weight: &dyn Fn(u32, usize) -> Option<sgemm512::Stored<'w>>,
    cache: &mut PackCache,
) -> Arc<Vec<sgemm512::PackedB>> {
    let b = &s.inputs[1];
    let Some(i) = packable(s, kernel) else { return Arc::default() };
    let r = b.ty.rank();
    if let Some(p) = cache.get(&(i, tb)) {
        return p.clone();
    }
    let Some(data) = weight(i, b.ty.numel()) else { return Arc::default() };
    let (rows, cols) = (b.ty.shape[r - 2], b.ty.shape[r - 1]);
    // A `[.., rows, cols]` weight: `[n, k]` when the product transposes it, `[k, n]` otherwise.
    let (k, n) = if tb { (cols, rows) } else { (rows, cols) };
    let per = (rows * cols).max(1);
    let packed: Vec<_> = (0..data.len() / per).map(|bi| sgemm512::PackedB::pack_stored(data.slice(bi * per, per), k, n, tb)).collect();
    let p = Arc::new(packed);
    cache.insert((i, tb), p.clone());
    p
}

/// A 2-D constant right operand packed once at load (RoPE's rotation, `rotation_as_matmul`),
/// so the product runs the packed kernel, which allocates nothing per run.
pub(crate) fn pack_const(
    s: &Step,
    kernel: CpuKernel,
    tb: bool,
    consts: &[kiln_graph::program::ConstData],
) -> Option<Arc<Vec<sgemm512::PackedB>>> {
    let b = s.inputs.get(1)?;
    let Slot::Const(i) = b.slot else { return None };
    let c = consts.get(i as usize)?;
    if b.ty.rank() != 2 || c.values.len() != b.ty.numel() || !sgemm512::available() {
        return None;
    }
    if !matches!(kernel, CpuKernel::Gemm | CpuKernel::GemmEpilogue) {
        return None;
    }
    let (rows, cols) = (b.ty.shape[0], b.ty.shape[1]);
    let (k, n) = if tb { (cols, rows) } else { (rows, cols) };
    let bytes: Vec<u8> = c.values.iter().flat_map(|&v| (v as f32).to_le_bytes()).collect();
    Some(Arc::new(vec![sgemm512::PackedB::pack_stored(sgemm512::Stored::F32(&bytes), k, n, tb)]))
}

/// The weight a step of `kernel` packs, if any (see [`pack_weight`]).
fn packable(s: &Step, kernel: CpuKernel) -> Option<u32> {
    let (a, b, o) = (&s.inputs.first()?.ty, s.inputs.get(1)?, &s.output.ty);
    let Slot::Weight(i) = b.slot else { return None };
    let r = b.ty.rank();
    if kernel == CpuKernel::GemmGated {
        // Two matrices stacked on a first axis of 2, each packed (`cpu/gated.rs`).
        return (r == 3 && b.ty.shape[0] == 2 && sgemm512::available()).then_some(i);
    }
    let batched =
        r > 2 && a.rank() == r && o.rank() == r && (a.shape[..r - 2] == b.ty.shape[..r - 2] || a.shape[..r - 2].iter().all(|&d| d == 1));
    ((r == 2 || batched) && sgemm512::available() && matches!(kernel, CpuKernel::Gemm | CpuKernel::GemmEpilogue)).then_some(i)
}

/// The weight (index, transposed) a stored step packs at load, if any.
pub(crate) fn packs(s: &Step) -> Option<(u32, bool)> {
    let i = packable(s, CpuKernel::parse(&s.kernel)?)?;
    Some((i, transpose_b(&s.op)?))
}

/// Whether a matmul (plain or gated) reads its weight transposed; `None` for other ops.
pub(crate) fn transpose_b(op: &Op) -> Option<bool> {
    match op {
        Op::MatMul { transpose_b, .. } | Op::GatedMatMul { transpose_b, .. } => Some(*transpose_b),
        _ => None,
    }
}

/// Whether `matmul` computes step `s` from the packed weight alone (never reading the
/// unpacked right-hand side): then `load` may free the unpacked copy.
pub(crate) fn runs_packed(s: &Step, packed: &[sgemm512::PackedB]) -> bool {
    if let Op::GatedMatMul { .. } = s.op {
        return packed.len() == 2;
    }
    let (at, bt, ot) = (&s.inputs[0].ty, &s.inputs[1].ty, &s.output.ty);
    let (ra, rb, ro) = (at.rank(), bt.rank(), ot.rank());
    if ra < 2 || rb < 2 || ro < 2 {
        return false;
    }
    let b_batches: usize = bt.shape[..rb - 2].iter().product();
    let a_batches: usize = at.shape[..ra - 2].iter().product();
    let out_batches: usize = ot.shape[..ro - 2].iter().product();
    (packed.len() == 1 && b_batches == 1 && a_batches == out_batches)
        || (packed.len() == out_batches && b_batches == out_batches && (a_batches == out_batches || a_batches == 1) && out_batches > 1)
}

/// Points each `cpu.gather` whose table is a 2-D weight that some matmul packs transposed (a
/// tied embedding, `[V, D]`, packed as the LM head's `D x V` right-hand side) at those panels:
/// row `v` of the table is column `v` of the packed matrix, the same values (f32, or the bf16
/// bits the gather widens). The table then needs no copy of its own, in memory or in a
/// prepared file.
pub(crate) fn link_gathers(program: &Program, prepared: &mut [Vec<Prepared>], cache: &PackCache) {
    for (e, preps) in program.entries.iter().zip(prepared.iter_mut()) {
        for (s, p) in e.steps.iter().zip(preps.iter_mut()) {
            let Some(Slot::Weight(w)) = s.inputs.first().map(|o| o.slot) else { continue };
            let table = &s.inputs[0].ty;
            let fits = |m: &[sgemm512::PackedB]| matches!(m, [b] if table.rank() == 2 && b.n == table.shape[0] && b.k == table.shape[1]);
            match cache.get(&(w, true)) {
                Some(m) if p.kernel == CpuKernel::Gather && fits(m) => p.prep = super::exec::Prep::Gather(m.clone()),
                Some(_) | None => {}
            }
        }
    }
}
