//! A KV-cache row write (`write_slice` in place, one `write_rows` launch) done by the matmul
//! launch that computes its rows (issue 16): decode's one row and prefill's prompt rows alike,
//! V's rows a range of the stacked projection's output, K's rows the output of k's rotation. The matmul stores each element of
//! that range into the cache as well (`kiln_kernels::cube::index::store_row`), and the write
//! makes no launch. The write moves to the matmul's place, so, as for a joined pair
//! ([`super::merge`]):
//!
//! - its rows are f32 elements inside the matmul's output, its cache f32;
//! - every step between the two (that launches anything) is independent of the write (reads
//!   neither its cache nor writes its rows, position or cache);
//! - the matmul reads neither the cache nor the position's bytes as its output.

use super::merge::{overlaps, range, Access};
use super::Launch;
use kiln_graph::program::{Slot, Step};
use kiln_graph::{DType, Op};
use kiln_kernels::cube::typed::Repr;

/// The element offset of `rows` within `out` (f32 operands in the arena), if inside it.
fn inside(rows: &kiln_graph::program::Operand, out: &kiln_graph::program::Operand) -> Option<usize> {
    let (Some(r), Some(o)) = (range(rows), range(out)) else { return None };
    let Slot::Arena { offset, .. } = rows.slot else { return None };
    let end = offset + rows.ty.bytes();
    (rows.ty.dtype == DType::F32 && out.ty.dtype == DType::F32 && r.0 >= o.0 && end <= o.1 && (r.0 - o.0) % 4 == 0).then(|| (r.0 - o.0) / 4)
}

/// Moves each cache row write it can into the matmul launch computing its rows (see the module
/// doc), in place: the write's launches go. Returns (write, matmul) of each.
pub(super) fn absorb_cache_writes(steps: &[Step], work: &mut [Vec<Launch>], meta: &mut Vec<u32>) -> Vec<(usize, usize)> {
    let mut absorbed = Vec::new();
    for j in 0..steps.len() {
        let w = &steps[j];
        let in_place = matches!(w.op, Op::WriteSlice { .. }) && w.inputs[0].slot == w.output.slot && w.output.ty.dtype == DType::F32;
        let Some(Launch::WriteRows { cfg: wcfg, meta: wm, len: wl, .. }) = work[j].first().filter(|_| in_place && work[j].len() == 1)
        else {
            continue;
        };
        if wcfg.out != Repr::Float {
            continue;
        }
        let (wcfg, wm, wl) = (wcfg.clone(), *wm, *wl);
        let wa = Access::of(w);
        let mut host = None;
        for i in (0..j).rev() {
            if work[i].is_empty() {
                continue;
            }
            if let Some(delta) = inside(&w.inputs[1], &steps[i].output) {
                host = Some((i, delta));
                break;
            }
            if !Access::of(&steps[i]).independent(&wa) || absorbed.iter().any(|&(_, h)| h == i) {
                break;
            }
        }
        let Some((i, delta)) = host else { continue };
        let h = &steps[i];
        let cache = range(&w.output);
        let reads_pos = matches!((range(&w.inputs[2]), range(&h.output)), (Some(p), Some(o)) if overlaps(p, o));
        if Access::of(h).reads(cache) || reads_pos || absorbed.iter().any(|&(_, x)| x == i) {
            continue;
        }
        let [Launch::MatMul { cfg, meta: hm, len: hl, .. }] = work[i].as_mut_slice() else { continue };
        if cfg.parts != 1 || cfg.stores != [None] {
            continue;
        }
        let mut block = meta[*hm..*hm + *hl].to_vec();
        block.push(delta as u32);
        block.extend_from_slice(&meta[wm..wm + wl]);
        meta.resize(meta.len().next_multiple_of(64), 0);
        (*hm, *hl) = (meta.len(), block.len());
        meta.extend(block);
        cfg.stores = vec![Some(wcfg.idx)];
        work[j].clear();
        absorbed.push((j, i));
    }
    absorbed
}
