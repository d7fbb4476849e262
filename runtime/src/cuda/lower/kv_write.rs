//! Decode's K and V cache writes inside the attention that reads the caches (issue 16): where
//! an attention step runs the row kernel (`attn_rows_<t>`, `attn_rows1_<t>`) on caches that two
//! in-place `write_slice` steps (`write_rows_*`) filled earlier in the entry, the attention runs
//! `attn_rows_new_<t>` / `attn_rows1_new_<t>` instead: it reads keys `[at, at + n)` from the
//! new rows themselves, and one block per (batch row, kv head) stores them into the caches
//! (`kernels/src/cuda/attention.cu`). The writes then make no launch. This runs after the
//! schedule and the memory plan are fixed, so it moves a write to the attention's position only
//! where that changes no byte any step reads:
//!
//! - no step between the write and the attention (that launches anything) reads the cache or
//!   writes the cache, the new rows or the position (which the attention now reads);
//! - the attention's output overlaps none of the caches, the new rows or the position;
//! - K's and V's writes are two steps at one position operand, with as many rows each.
//!
//! Prefill's tensor-core attention does its writes by the rule of [`super::kv_prefill`]. Elsewhere
//! (a module without the entries) the writes keep their launches.

use super::merge::{overlaps, range, Range};
use super::{Launch, Layout, Work};
use kiln_graph::program::Step;
use kiln_graph::{DType, Op, TensorType};
use kiln_kernels::cuda::AttnParams;
use std::mem::offset_of;

/// The entry of the row kernel `kernel` (`attn_rows_<t>`, `attn_rows1_<t>`) that also stores
/// the new K and V rows: `attn_rows_new_<t>`, `attn_rows1_new_<t>`.
pub fn new_rows_kernel(kernel: &str) -> Option<String> {
    ["attn_rows1_", "attn_rows_"].into_iter().find_map(|pre| {
        let t = kernel.strip_prefix(pre)?;
        (!t.starts_with("new_")).then(|| format!("{pre}new_{t}"))
    })
}

/// An in-place cache write (`write_slice` on axis 1 of `[B, S, Hkv, D]`) the attention may do.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct CacheWrite {
    pub step: usize,
    /// The new rows `[B, n, Hkv, D]`.
    pub rows: Range,
    /// The 1-element position.
    pub pos: Range,
    pub pos_i64: bool,
    pub n: usize,
}

/// Step `w` as a write of `kv` (the attention's cache operand, at `cache`), if it is one.
pub(super) fn cache_write(steps: &[Step], work: &[Vec<Work>], l: &Layout, w: usize, cache: Range, kv: &TensorType) -> Option<CacheWrite> {
    let s = &steps[w];
    let [Work::Kernel(k)] = work[w].as_slice() else { return None };
    if !matches!(s.op, Op::WriteSlice { axis: 1 }) || !k.kernel.starts_with("write_rows_") || s.inputs.len() != 3 {
        return None;
    }
    let (dst, rows, pos) = (&s.inputs[0], &s.inputs[1], &s.inputs[2]);
    let in_place = dst.slot == s.output.slot && range(&s.output, l).ok()? == cache;
    let (r, c) = (&rows.ty.shape, &kv.shape);
    let shaped = s.output.ty == *kv && c.len() == 4 && r.len() == 4 && (r[0], r[2], r[3]) == (c[0], c[2], c[3]) && r[1] > 0;
    let pos_i64 = match pos.ty.dtype {
        DType::I64 => true,
        DType::I32 => false,
        _ => return None,
    };
    if !in_place || !shaped || rows.ty.dtype != kv.dtype || pos.ty.numel() != 1 || r[1] > i32::MAX as usize {
        return None;
    }
    let (rows_at, pos_at) = (range(rows, l).ok()?, range(pos, l).ok()?);
    if overlaps(rows_at, cache) || overlaps(pos_at, cache) {
        return None;
    }
    Some(CacheWrite { step: w, rows: rows_at, pos: pos_at, pos_i64, n: r[1] })
}

/// What step `i` writes and reads, with the steps it absorbed (`absorbed`, (write, step)).
pub(super) fn touches(steps: &[Step], l: &Layout, absorbed: &[(usize, usize)], i: usize) -> Option<(Vec<Range>, Vec<Range>)> {
    let (mut writes, mut reads) = (Vec::new(), Vec::new());
    for s in std::iter::once(i).chain(absorbed.iter().filter(|&&(_, h)| h == i).map(|&(w, _)| w)).map(|j| &steps[j]) {
        writes.push(range(&s.output, l).ok()?);
        for o in &s.inputs {
            reads.push(range(o, l).ok()?);
        }
    }
    Some((writes, reads))
}

/// The write of the cache at `cache` (`kv`) that attention step `a` may do: the nearest earlier
/// step that launches something and writes those bytes, if it is such a write and no step
/// between reads the cache or writes the cache, the new rows or the position.
fn writer(
    steps: &[Step],
    work: &[Vec<Work>],
    l: &Layout,
    absorbed: &[(usize, usize)],
    a: usize,
    kv: (Range, &TensorType),
) -> Option<CacheWrite> {
    let (cache, ty) = kv;
    let hits = |rs: &[Range], r: Range| rs.iter().any(|&x| overlaps(x, r));
    let mut between = Vec::new();
    for i in (0..a).rev().filter(|&i| !work[i].is_empty()) {
        let (writes, reads) = touches(steps, l, absorbed, i)?;
        if hits(&writes, cache) {
            let cw = cache_write(steps, work, l, i, cache, ty)?;
            let clear = between.iter().all(|(w, r): &(Vec<Range>, Vec<Range>)| !hits(w, cw.rows) && !hits(w, cw.pos) && !hits(r, cache));
            return clear.then_some(cw);
        }
        between.push((writes, reads));
    }
    None
}

/// K's and V's writes attention step `a` may do, and its kernel's entry that does them.
fn plan(
    steps: &[Step],
    work: &[Vec<Work>],
    l: &Layout,
    has: &dyn Fn(&str) -> bool,
    absorbed: &[(usize, usize)],
    a: usize,
) -> Option<(CacheWrite, CacheWrite, String)> {
    let s = &steps[a];
    let Some(Work::Kernel(first)) = work[a].first() else { return None };
    if !matches!(s.op, Op::Attention(_)) || s.inputs.len() < 3 {
        return None;
    }
    let new = new_rows_kernel(&first.kernel).filter(|k| has(k))?;
    let (kc, vc, out) = (range(&s.inputs[1], l).ok()?, range(&s.inputs[2], l).ok()?, range(&s.output, l).ok()?);
    if overlaps(kc, vc) {
        return None;
    }
    let k = writer(steps, work, l, absorbed, a, (kc, &s.inputs[1].ty))?;
    let v = writer(steps, work, l, absorbed, a, (vc, &s.inputs[2].ty))?;
    if k.step == v.step || k.pos != v.pos || k.pos_i64 != v.pos_i64 || k.n != v.n {
        return None;
    }
    // The attention now reads the new rows and the position while it writes its output.
    if [kc, vc, k.rows, v.rows, k.pos].iter().any(|&r| overlaps(r, out)) {
        return None;
    }
    Some((k, v, new))
}

fn put(params: &mut [u8], at: usize, bytes: &[u8]) {
    params[at..at + bytes.len()].copy_from_slice(bytes);
}

/// `rows` (the attention's row launch) as `kernel` doing the writes `k` and `v`.
fn absorbing(rows: &Launch, kernel: String, k: &CacheWrite, v: &CacheWrite, l: &Layout) -> Launch {
    let mut r = rows.clone();
    r.kernel = kernel;
    let addrs = [(offset_of!(AttnParams, new_k), k.rows.0), (offset_of!(AttnParams, new_v), v.rows.0)];
    let addrs = addrs.into_iter().chain([(offset_of!(AttnParams, at), k.pos.0), (offset_of!(AttnParams, err), l.error_flag as u64)]);
    for (at, a) in addrs {
        put(&mut r.params, at, &a.to_le_bytes());
        r.relocs.push(at);
    }
    put(&mut r.params, offset_of!(AttnParams, at_i64), &i32::from(k.pos_i64).to_le_bytes());
    put(&mut r.params, offset_of!(AttnParams, n), &(k.n as i32).to_le_bytes());
    r
}

/// Moves K's and V's cache writes into the attention that reads the caches (see the module
/// doc), or into prefill's tensor-core attention that reads the rows ([`super::kv_prefill`]),
/// in `work` (one list per step of `steps`, lowered in order, split attention already one
/// launch where it is): the writes' launches go, the attention's launch runs the `_new` entry,
/// where `has(kernel)` says it may be launched (a CUBIN stored before it lacks it). Returns the
/// (write, attention) steps.
pub fn absorb_cache_writes(steps: &[Step], work: &mut [Vec<Work>], l: &Layout, has: &dyn Fn(&str) -> bool) -> Vec<(usize, usize)> {
    let mut absorbed = Vec::new();
    for a in 0..steps.len() {
        let Some((k, v, kernel)) = plan(steps, work, l, has, &absorbed, a) else {
            if let Some(f) = super::kv_prefill::plan(steps, work, l, has, &absorbed, a) {
                super::kv_prefill::absorb(work, l, a, &f, &mut absorbed);
            }
            continue;
        };
        let Some(Work::Kernel(rows)) = work[a].first() else { continue };
        work[a][0] = Work::Kernel(absorbing(rows, kernel, &k, &v, l));
        for w in [k.step, v.step] {
            work[w].clear();
            absorbed.push((w, a));
        }
    }
    absorbed
}

#[cfg(test)]
mod tests {
    use super::super::tests::{arena, exp_between as exp, kernels, tt, FOLD_LAYOUT as LAYOUT};
    use super::super::{lower_entry, with_kernel};
    use super::*;
    use kiln_graph::program::Operand;
    use kiln_graph::{Attention, MaskKind};

    const HKV: usize = 2;
    const D: usize = 64;
    // The operands' offsets: the caches, K's and V's new rows, the position, q, the output.
    const KC: usize = 0;
    const VC: usize = 1 << 20;
    const RK: usize = 1 << 21;
    const RV: usize = RK + (1 << 16);
    const POS: usize = RK + (1 << 17);
    const Q: usize = 1 << 22;
    const OUT: usize = Q + (1 << 16);

    fn cache(at: usize, sk: usize) -> Operand {
        arena(at, tt(DType::BF16, &[1, sk, HKV, D]))
    }

    /// `n` rows at `rows` written into the `[1, sk, 2, 64]` cache at `dst` at the i64 position at `pos`.
    fn write(dst: usize, sk: usize, rows: usize, n: usize, pos: usize) -> Step {
        let inputs = vec![cache(dst, sk), arena(rows, tt(DType::BF16, &[1, n, HKV, D])), arena(pos, tt(DType::I64, &[1]))];
        with_kernel(Step { node: 0, op: Op::WriteSlice { axis: 1 }, kernel: String::new(), inputs, output: cache(dst, sk) })
    }

    /// Attention of `sq` query rows of 4 heads against the caches, its output at `out`.
    fn attention(sq: usize, sk: usize, out: usize) -> Step {
        let att = Op::Attention(Attention { scale: 0.1, softcap: Some(50.0), mask: MaskKind::Causal { q_offset: sk - sq } });
        let q = tt(DType::BF16, &[1, sq, 4, D]);
        let inputs = vec![arena(Q, q.clone()), cache(KC, sk), cache(VC, sk)];
        with_kernel(Step { node: 0, op: att, kernel: String::new(), inputs, output: arena(out, q) })
    }

    /// Decode as Gemma 2 orders it: V's write, a step between, K's write, the attention.
    fn decode(sk: usize) -> Vec<Step> {
        vec![write(VC, sk, RV, 1, POS), exp(1 << 23, (1 << 23) + 4096), write(KC, sk, RK, 1, POS), attention(1, sk, OUT)]
    }

    fn read(k: &Launch, at: usize, bytes: usize) -> u64 {
        let mut b = [0u8; 8];
        b[..bytes].copy_from_slice(&k.params[at..at + bytes]);
        u64::from_le_bytes(b)
    }

    /// The work without the new entries: the two writes as one `_x2` launch.
    fn two_launch(steps: &[Step]) -> Vec<Vec<Work>> {
        lower_entry(steps, &LAYOUT, &|k| !k.contains("_new_")).unwrap().work
    }

    #[test]
    fn the_attention_does_the_cache_writes() {
        for (sk, kernel) in [(64, "attn_rows_new_bf16"), (1056, "attn_rows1_new_bf16")] {
            let steps = decode(sk);
            let l = lower_entry(&steps, &LAYOUT, &|_| true).unwrap();
            assert_eq!(l.absorbed, [(2, 3), (0, 3)], "{sk}");
            assert!(l.work[0].is_empty() && l.work[2].is_empty() && l.pairs.is_empty(), "{sk}: {:?}", l.work);
            let old = two_launch(&steps);
            let (new, old) = (kernels(&l.work[3]), kernels(&old[3]));
            assert_eq!(new.len(), 1);
            assert_eq!(new[0].kernel, kernel);
            // The attention's own fields as before; the new ones point at the rows and position.
            let own = offset_of!(AttnParams, new_k);
            assert_eq!((new[0].grid, &new[0].params[..own]), (old[0].grid, &old[0].params[..own]));
            assert_eq!(new[0].params.len(), std::mem::size_of::<AttnParams>());
            let fields = [(offset_of!(AttnParams, new_k), RK), (offset_of!(AttnParams, new_v), RV), (offset_of!(AttnParams, at), POS)];
            for (at, want) in fields.into_iter().chain([(offset_of!(AttnParams, err), LAYOUT.error_flag)]) {
                assert_eq!(read(new[0], at, 8), want as u64, "{sk}: field at {at}");
                assert!(new[0].relocs.contains(&at) && !old[0].relocs.contains(&at));
            }
            assert_eq!((read(new[0], offset_of!(AttnParams, at_i64), 4), read(new[0], offset_of!(AttnParams, n), 4)), (1, 1));
        }
        // A module with the row kernels' `_new` entries but not attn_rows1's: the split
        // attention's two launches, the first doing the writes.
        let l = lower_entry(&decode(1056), &LAYOUT, &|k| !k.starts_with("attn_rows1")).unwrap();
        let names: Vec<&str> = kernels(&l.work[3]).iter().map(|k| k.kernel.as_str()).collect();
        assert_eq!((names, l.absorbed.len()), (vec!["attn_rows_new_bf16", "attn_combine_bf16"], 2));
    }

    /// `steps` lowered keep their two writes: as with no `_new` entry loaded.
    fn refused(steps: &[Step], why: &str) {
        let l = lower_entry(steps, &LAYOUT, &|_| true).unwrap();
        assert!(l.absorbed.is_empty(), "{why}: {:?}", l.absorbed);
        assert_eq!(l.work, two_launch(steps), "{why}");
    }

    #[test]
    fn the_writes_keep_their_launch_where_moving_them_changes_a_byte() {
        let mut s = decode(64);
        s[1] = exp(RK, (1 << 23) + 4096);
        assert_eq!(lower_entry(&s, &LAYOUT, &|_| true).unwrap().absorbed.len(), 2, "a step between may read the new rows");
        for (between, why) in [
            (exp(1 << 23, KC + 512), "a step between writes the K cache"),
            (exp(1 << 23, RK), "a step between writes K's new rows"),
            (exp(1 << 23, POS), "a step between writes the position"),
            (exp(KC, (1 << 23) + 4096), "a step between reads the K cache"),
        ] {
            // Between K's write and the attention (V's is absorbed only with K's).
            let mut s = decode(64);
            s.insert(3, between);
            refused(&s, why);
        }
        let mut s = decode(64);
        s[0] = write(VC, 64, RV, 1, POS + 256);
        refused(&s, "V's write at another position");
        s[0] = write(VC, 64, RV, 2, POS);
        refused(&s, "V's write of more rows");
        s = decode(64);
        s[3] = attention(1, 64, RK);
        refused(&s, "the attention's output takes K's new rows' bytes");
        s = decode(64);
        s.remove(2);
        refused(&s, "no K write");
    }

    #[test]
    fn prefill_and_an_old_module_keep_the_writes() {
        // 64 rows written, then the tensor-core attention of 64 query rows reading the caches
        // (prefill's reads the rows themselves: `super::super::kv_prefill`).
        let steps = vec![write(VC, 128, RV, 64, POS), write(KC, 128, RK, 64, POS), attention(64, 128, OUT)];
        assert!(kernels(&two_launch(&steps)[2])[0].kernel.starts_with("attn_mma_"));
        refused(&steps, "an mma attention reading the caches");
        // The loaded module lacks the new entries: unchanged.
        let l = lower_entry(&decode(64), &LAYOUT, &|k| !k.contains("_new_")).unwrap();
        assert!(l.absorbed.is_empty() && kernels(&l.work[2])[0].kernel == "write_rows_b2_i64_x2");
        assert_eq!(new_rows_kernel("attn_rows_bf16").as_deref(), Some("attn_rows_new_bf16"));
        assert_eq!(new_rows_kernel("attn_rows1_f16").as_deref(), Some("attn_rows1_new_f16"));
        for k in ["attn_rows_new_bf16", "attn_rows1_new_bf16", "attn_combine_bf16", "attn_mma_bf16_d64"] {
            assert_eq!(new_rows_kernel(k), None, "{k}");
        }
    }
}
