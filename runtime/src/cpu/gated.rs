//! `cpu.gemm_gated`: [`Op::GatedMatMul`], a GLU's gate and up projections and their epilogue
//! (`gelu(x @ w_gate) * (x @ w_up)`) as one parallel pass. With the AVX-512 kernel each task
//! computes its block of gate columns into a scratch of its own, the same block of up columns
//! into the output, and applies the epilogue to that block before storing it
//! (`sgemm512::matmul_packed_gated`): the gate product is never written whole. The products'
//! elements are the bits `cpu.gemm` gives and the epilogue is the unfused step's
//! ([`Region`]: the same f32 operations in the same order), so the step gives the unfused
//! steps' bits.

use super::exec::Prep;
use super::fused::{Region, Src};
use super::kernel::CpuKernel;
use super::pack::{self, PackCache};
use kiln_graph::program::{Operand, Step};
use kiln_graph::{DType, Op};
use kiln_kernels::cpu::{gemm, sgemm512};

/// The step's epilogue over (gate, up, extra inputs) and its two weights packed (when the
/// AVX-512 kernel runs: one matrix per half of the stacked weight).
pub(crate) fn prepare<'w>(
    s: &Step,
    weight: &dyn Fn(u32, usize) -> Option<sgemm512::Stored<'w>>,
    cache: &mut PackCache,
) -> Result<Prep, String> {
    let Op::GatedMatMul { transpose_b, epilogue } = &s.op else { return Err("not a gated matmul".into()) };
    let (out, dt) = (s.output.ty.shape.as_slice(), s.inputs[0].ty.dtype);
    let mut sh: Vec<(&[usize], DType)> = vec![(out, dt), (out, dt)];
    sh.extend(s.inputs[2..].iter().map(|o| (o.ty.shape.as_slice(), o.ty.dtype)));
    let region = Region::new(epilogue.clone(), &sh, out)?;
    let packed = pack::pack_weight(s, CpuKernel::GemmGated, *transpose_b, weight, cache);
    Ok(Prep::MatMul { epilogue: Some(region), packed })
}

/// Runs the step: `a` the rows, `read` an operand's data, `c` the output.
pub(crate) fn run<'a>(
    s: &Step,
    tb: bool,
    region: &Region,
    packed: &[sgemm512::PackedB],
    a: &[f32],
    read: &dyn Fn(&Operand) -> Src<'a>,
    c: &mut [f32],
) -> Result<(), String> {
    let k = *s.inputs[0].ty.shape.last().unwrap_or(&0);
    let n = *s.output.ty.shape.last().unwrap_or(&0);
    let m = a.len() / k.max(1);
    let mut extra = [Src::F32(&[]); super::fused::MAX_INPUTS];
    for (i, o) in s.inputs[2..].iter().enumerate() {
        extra[i] = read(o);
    }
    let extra = &extra[..s.inputs.len() - 2];
    if let [gate, up] = packed {
        let epilogue = |row: usize, col0: usize, g: &[f32], part: &mut [f32]| region.eval_gated(extra, g, part, row, col0);
        sgemm512::matmul_packed_gated(a, m, k, gate, up, c, &epilogue);
        return Ok(());
    }
    // No AVX-512: both products whole (the gate in a buffer made here), then the epilogue.
    let Src::F32(b) = read(&s.inputs[1]) else { return Err("the stacked weight is not f32".into()) };
    let view = |data| if tb { gemm::MatView::transposed(data, k, n) } else { gemm::MatView::row_major(data, k, n) };
    let mut gate = vec![0f32; m * n];
    gemm::matmul(gemm::MatView::row_major(a, m, k), view(&b[..k * n]), &mut gate);
    gemm::matmul(gemm::MatView::row_major(a, m, k), view(&b[k * n..]), c);
    for (r, (g, part)) in gate.chunks(n.max(1)).zip(c.chunks_mut(n.max(1))).enumerate() {
        region.eval_gated(extra, g, part, r, 0);
    }
    Ok(())
}
