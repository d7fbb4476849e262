//! Prefill's K and V cache writes inside its tensor-core attention (issue 16). In prefill the
//! attention reads the prompt's keys and values themselves (`[B, Sk, Hkv, D]`, `Sq == Sk`), and
//! two in-place `write_slice` steps (`write_rows_*`) copy exactly those tensors into the caches
//! `[B, S, Hkv, D]` at row `at`. Where the attention runs the default `attn_mma_<t>_d<D>` and
//! the loaded module holds `attn_mma_new_<t>_d<D>` ([`mma_new_kernel`]: head dims with no
//! variant), it runs that entry instead: the blocks of the first query head of each kv group
//! store their q tile's rows of k and v into the caches (`kernels/src/cuda/attention_mma.cuh`),
//! and the writes make no launch. Like decode's ([`super::kv_write`]) this runs after the
//! schedule and the memory plan are fixed, so it moves a write to the attention's position only
//! where that changes no byte any step reads. A write may come before the attention (Gemma 2
//! schedules V's there) or after it (K's), and the rule is the same both ways:
//!
//! - the write's rows are the attention's k (or v) operand: the same bytes, the same type;
//! - no step between the write and the attention (that launches anything, with the steps an
//!   attention between does in its launch) reads or writes the cache, nor writes the rows or
//!   the position: a write moved later would otherwise let a step between see the cache
//!   before it, or copy rows or read a position rewritten in between; moved earlier, a step
//!   between would see the cache after it, or the write would read the rows or the position
//!   before they were (re)written;
//! - the caches overlap each other, the attention's operands and its output nowhere, and the
//!   output overlaps neither the rows nor the position: the launch reads those while its
//!   blocks store the caches and write the output;
//! - K's and V's writes are two steps at one position operand, into caches of one type, with
//!   16-byte aligned rows and caches (the kernel copies 16-byte vectors).
//!
//! A variant chosen at load (`attn_tune`) replaces the default kernel only: no head dim with
//! variants has the storing entry, so there the writes keep their launch, as they do in a
//! module that lacks the entry (or with `CudaBackend::fuse` off: the entry is a fusing one).
//!
//! Nothing here has run on a GPU: this file's tests check the lowering, and
//! `kernels/tests/cuda_compile.rs` that the entries compile for sm_90a without spilling. The
//! storing kernel runs on the CPU through the host emulator (`tests/cuda_emulated.rs`: a
//! random-weight Gemma 2 of head dim 64, prefill and decode against the interpreter, every
//! layer's cache included). On a GPU the device script (`scripts/device_cuda.sh`, section
//! `gemma`) generates with Gemma 2 2B (head dim 256) with and without `--cuda-fuse off` (which
//! keeps the writes' launches) and compares ids and log-probabilities bit for bit; no fixture it
//! runs against a reference has a tensor-core head dim (16, 32, 40).

use super::kv_write::{cache_write, touches, CacheWrite};
use super::merge::{overlaps, range, Range};
use super::{Launch, Layout, Work};
use kiln_graph::program::{Operand, Step};
use kiln_graph::Op;
use kiln_kernels::cuda::attn::mma_new_kernel;
use kiln_kernels::cuda::AttnParams;
use std::mem::offset_of;

/// K's and V's writes an attention does, its storing entry and the caches' rows.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct PrefillFold {
    k: CacheWrite,
    v: CacheWrite,
    caches: (Range, Range),
    kernel: String,
    cache_rows: usize,
}

/// The write that copies the attention's operand `rows` into a cache, with that cache's
/// range: the nearest step either side of attention `a` that is such a write and that no step
/// between keeps from moving (the module doc's rule).
fn write_of(
    steps: &[Step],
    work: &[Vec<Work>],
    l: &Layout,
    absorbed: &[(usize, usize)],
    a: usize,
    rows: &Operand,
) -> Option<(CacheWrite, Range)> {
    let want = range(rows, l).ok()?;
    let candidate = |w: usize| {
        let s = &steps[w];
        let cache = range(&s.output, l).ok()?;
        let cw = cache_write(steps, work, l, w, cache, &s.output.ty)?;
        (s.inputs[1].ty == rows.ty && cw.rows == want).then_some((cw, cache))
    };
    let hits = |rs: &[Range], r: Range| rs.iter().any(|&x| overlaps(x, r));
    let movable = |(cw, cache): &(CacheWrite, Range)| {
        let (lo, hi) = (a.min(cw.step), a.max(cw.step));
        (lo + 1..hi).filter(|&i| !work[i].is_empty()).all(|i| {
            touches(steps, l, absorbed, i).is_some_and(|(writes, reads)| {
                !hits(&writes, *cache) && !hits(&reads, *cache) && !hits(&writes, cw.rows) && !hits(&writes, cw.pos)
            })
        })
    };
    let mut order: Vec<usize> = (0..steps.len()).filter(|&i| i != a && !work[i].is_empty()).collect();
    order.sort_by_key(|&i| i.abs_diff(a));
    order.into_iter().filter_map(candidate).find(movable)
}

/// K's and V's writes prefill attention step `a` may do (see the module doc).
pub(super) fn plan(
    steps: &[Step],
    work: &[Vec<Work>],
    l: &Layout,
    has: &dyn Fn(&str) -> bool,
    absorbed: &[(usize, usize)],
    a: usize,
) -> Option<PrefillFold> {
    let s = &steps[a];
    let [Work::Kernel(mma)] = work[a].as_slice() else { return None };
    if !matches!(s.op, Op::Attention(_)) || s.inputs.len() < 3 {
        return None;
    }
    let kernel = mma_new_kernel(&mma.kernel).filter(|k| has(k))?;
    let (q, kt) = (&s.inputs[0].ty.shape, &s.inputs[1].ty.shape);
    if q.len() != 4 || kt.len() != 4 || q[1] != kt[1] || s.inputs[1].ty != s.inputs[2].ty {
        return None;
    }
    let (k, kc) = write_of(steps, work, l, absorbed, a, &s.inputs[1])?;
    let (v, vc) = write_of(steps, work, l, absorbed, a, &s.inputs[2])?;
    let cache_ty = &steps[k.step].output.ty;
    if k.step == v.step || k.pos != v.pos || k.pos_i64 != v.pos_i64 || *cache_ty != steps[v.step].output.ty || overlaps(kc, vc) {
        return None;
    }
    let out = range(&s.output, l).ok()?;
    let mut operands = s.inputs.iter().map(|o| range(o, l)).collect::<Result<Vec<Range>, String>>().ok()?;
    operands.push(out);
    if operands.iter().any(|&r| overlaps(r, kc) || overlaps(r, vc)) || [k.rows, v.rows, k.pos].iter().any(|&r| overlaps(r, out)) {
        return None;
    }
    if [k.rows.0, v.rows.0, kc.0, vc.0].iter().any(|x| x % 16 != 0) {
        return None;
    }
    Some(PrefillFold { k, v, caches: (kc, vc), kernel, cache_rows: cache_ty.shape[1] })
}

fn put(params: &mut [u8], at: usize, bytes: &[u8]) {
    params[at..at + bytes.len()].copy_from_slice(bytes);
}

/// The attention's launch `mma` as the storing entry doing the writes of `f`.
fn storing(mma: &Launch, f: &PrefillFold, l: &Layout) -> Launch {
    let mut r = mma.clone();
    r.kernel = f.kernel.clone();
    let addrs = [
        (offset_of!(AttnParams, cache_k), f.caches.0 .0),
        (offset_of!(AttnParams, cache_v), f.caches.1 .0),
        (offset_of!(AttnParams, at), f.k.pos.0),
        (offset_of!(AttnParams, err), l.error_flag as u64),
    ];
    for (at, a) in addrs {
        put(&mut r.params, at, &a.to_le_bytes());
        r.relocs.push(at);
    }
    put(&mut r.params, offset_of!(AttnParams, at_i64), &i32::from(f.k.pos_i64).to_le_bytes());
    put(&mut r.params, offset_of!(AttnParams, n), &(f.k.n as i32).to_le_bytes());
    put(&mut r.params, offset_of!(AttnParams, cache_rows), &(f.cache_rows as i32).to_le_bytes());
    r
}

/// Makes attention step `a` do the writes of `f` (from [`plan`]): its launch runs the storing
/// entry, the writes' launches go, and (write, `a`) joins `absorbed` for each.
pub(super) fn absorb(work: &mut [Vec<Work>], l: &Layout, a: usize, f: &PrefillFold, absorbed: &mut Vec<(usize, usize)>) {
    let Some(Work::Kernel(mma)) = work[a].first() else { return };
    work[a][0] = Work::Kernel(storing(mma, f, l));
    for w in [f.k.step, f.v.step] {
        work[w].clear();
        absorbed.push((w, a));
    }
}

#[cfg(test)]
mod tests {
    use super::super::merge::fusing;
    use super::super::tests::{arena, exp_between as exp, kernels, tt, FOLD_LAYOUT as LAYOUT};
    use super::super::{lower_entry, with_kernel};
    use super::*;
    use kiln_graph::{Attention, DType, MaskKind};

    const HKV: usize = 2;
    const S: usize = 128;
    const SK: usize = 64;
    // The operands' offsets: the caches, K's and V's rows, the position, q, the output.
    const KC: usize = 0;
    const VC: usize = 1 << 20;
    const RK: usize = 1 << 21;
    const RV: usize = RK + (1 << 17);
    const POS: usize = RK + (1 << 18);
    const Q: usize = 1 << 22;
    const OUT: usize = Q + (1 << 18);
    const FREE: usize = 1 << 23;

    fn rows(at: usize, d: usize) -> Operand {
        arena(at, tt(DType::BF16, &[1, SK, HKV, d]))
    }

    fn cache(at: usize, d: usize) -> Operand {
        arena(at, tt(DType::BF16, &[1, S, HKV, d]))
    }

    /// The `SK` rows at `src` (head dim `d`) written into the cache at `dst` at the position at `pos`.
    fn write(dst: usize, src: usize, pos: usize, d: usize, pos_ty: DType) -> Step {
        let inputs = vec![cache(dst, d), rows(src, d), arena(pos, tt(pos_ty, &[1]))];
        with_kernel(Step { node: 0, op: Op::WriteSlice { axis: 1 }, kernel: String::new(), inputs, output: cache(dst, d) })
    }

    /// Causal attention of `sq` query rows of 4 heads against K's and V's rows, into `out`.
    fn attention(sq: usize, d: usize, out: usize) -> Step {
        let att = Op::Attention(Attention { scale: 0.1, softcap: Some(50.0), mask: MaskKind::Causal { q_offset: SK - sq } });
        let q = tt(DType::BF16, &[1, sq, 4, d]);
        let inputs = vec![arena(Q, q.clone()), rows(RK, d), rows(RV, d)];
        with_kernel(Step { node: 0, op: att, kernel: String::new(), inputs, output: arena(out, q) })
    }

    /// Prefill as Gemma 2 orders it: V's write, the attention, a step between, K's write.
    fn prefill(d: usize) -> Vec<Step> {
        let i64 = DType::I64;
        vec![write(VC, RV, POS, d, i64), attention(SK, d, OUT), exp(FREE, FREE + 4096), write(KC, RK, POS, d, i64)]
    }

    fn read(k: &Launch, at: usize, bytes: usize) -> u64 {
        let mut b = [0u8; 8];
        b[..bytes].copy_from_slice(&k.params[at..at + bytes]);
        u64::from_le_bytes(b)
    }

    /// The work with a module that lacks the storing entries.
    fn old_module(steps: &[Step]) -> Vec<Vec<Work>> {
        lower_entry(steps, &LAYOUT, &|k| !k.starts_with("attn_mma_new_")).unwrap().work
    }

    #[test]
    fn the_attention_stores_its_keys_and_values() {
        for (pos_ty, d) in [(DType::I64, 256), (DType::I32, 64), (DType::I64, 128)] {
            let mut steps = prefill(d);
            steps[0] = write(VC, RV, POS, d, pos_ty);
            steps[3] = write(KC, RK, POS, d, pos_ty);
            let l = lower_entry(&steps, &LAYOUT, &|_| true).unwrap();
            assert_eq!(l.absorbed, [(3, 1), (0, 1)], "d {d}");
            assert!(l.work[0].is_empty() && l.work[3].is_empty() && l.pairs.is_empty(), "d {d}: {:?}", l.work);
            // Without the entry: the two writes as one `_x2` launch at K's.
            let old = old_module(&steps);
            let it = if pos_ty == DType::I64 { "i64" } else { "i32" };
            assert!(old[0].is_empty() && kernels(&old[3])[0].kernel == format!("write_rows_b2_{it}_x2"), "d {d}: {old:?}");
            let (new, old) = (kernels(&l.work[1]), kernels(&old[1]));
            assert_eq!(new.len(), 1);
            assert_eq!(new[0].kernel, format!("attn_mma_new_bf16_d{d}"));
            assert_eq!(old[0].kernel, format!("attn_mma_bf16_d{d}"));
            // The attention's own fields, grid and shared memory as before; the new ones point
            // at the caches and the position.
            let own = offset_of!(AttnParams, new_k);
            assert_eq!((new[0].grid, new[0].smem, &new[0].params[..own]), (old[0].grid, old[0].smem, &old[0].params[..own]));
            assert_eq!(new[0].params.len(), std::mem::size_of::<AttnParams>());
            let fields = [
                (offset_of!(AttnParams, cache_k), KC),
                (offset_of!(AttnParams, cache_v), VC),
                (offset_of!(AttnParams, at), POS),
                (offset_of!(AttnParams, err), LAYOUT.error_flag),
            ];
            for (at, want) in fields {
                assert_eq!(read(new[0], at, 8), want as u64, "d {d}: field at {at}");
                assert!(new[0].relocs.contains(&at) && !old[0].relocs.contains(&at), "d {d}: field at {at}");
            }
            assert_eq!(read(new[0], offset_of!(AttnParams, new_k), 8), 0, "decode's rows stay unset");
            let ints = [(offset_of!(AttnParams, at_i64), u64::from(pos_ty == DType::I64)), (offset_of!(AttnParams, n), SK as u64)];
            for (at, want) in ints.into_iter().chain([(offset_of!(AttnParams, cache_rows), S as u64)]) {
                assert_eq!(read(new[0], at, 4), want, "d {d}: field at {at}");
            }
        }
    }

    #[test]
    fn writes_before_or_after_the_attention_fold() {
        let i64 = DType::I64;
        let both_before = vec![write(VC, RV, POS, 64, i64), write(KC, RK, POS, 64, i64), attention(SK, 64, OUT)];
        let l = lower_entry(&both_before, &LAYOUT, &|_| true).unwrap();
        assert_eq!(l.absorbed, [(1, 2), (0, 2)]);
        let both_after = vec![attention(SK, 64, OUT), write(VC, RV, POS, 64, i64), write(KC, RK, POS, 64, i64)];
        let l = lower_entry(&both_after, &LAYOUT, &|_| true).unwrap();
        assert_eq!(l.absorbed, [(2, 0), (1, 0)]);
        // A step between may read the rows and the position.
        for between in [exp(RK, FREE), exp(POS, FREE)] {
            let mut s = prefill(64);
            s[2] = between;
            assert_eq!(lower_entry(&s, &LAYOUT, &|_| true).unwrap().absorbed.len(), 2);
        }
    }

    /// `steps` lowered keep their writes' launches: as with a module lacking the entry.
    fn refused(steps: &[Step], why: &str) {
        let l = lower_entry(steps, &LAYOUT, &|_| true).unwrap();
        assert!(l.absorbed.is_empty(), "{why}: {:?}", l.absorbed);
        assert_eq!(l.work, old_module(steps), "{why}");
        assert!(kernels(&l.work[1])[0].kernel.starts_with("attn_mma_bf16_"), "{why}");
    }

    #[test]
    fn an_earlier_write_of_the_rows_bytes_is_not_taken_for_the_attentions() {
        // An earlier layer's K write copied what the rows' bytes held before a step rewrote
        // them with this layer's keys: nearer the attention than this layer's K write, but
        // the step between keeps it from moving; this layer's write is the one folded.
        let i64 = DType::I64;
        let mut s = prefill(64);
        s.splice(0..0, [write(KC + (1 << 18), RK, POS, 64, i64), exp(FREE, RK)]);
        s.insert(4, exp(FREE + 8192, FREE + 12288));
        s.insert(4, exp(FREE + 8192, FREE + 12288));
        // The old write 3 steps before the attention, this layer's K write 4 after it.
        let l = lower_entry(&s, &LAYOUT, &|_| true).unwrap();
        assert_eq!(l.absorbed, [(7, 3), (2, 3)]);
        assert_eq!(kernels(&l.work[0])[0].kernel, "write_rows_b2_i64");
    }

    #[test]
    fn the_writes_keep_their_launches_where_moving_them_changes_a_byte() {
        for (between, why) in [
            (exp(FREE, KC + 512), "a step between writes the K cache"),
            (exp(KC, FREE), "a step between reads the K cache"),
            (exp(FREE, RK), "a step between writes K's rows"),
            (exp(FREE, POS), "a step between writes the position"),
        ] {
            // Between the attention and K's write (after it).
            let mut s = prefill(64);
            s[2] = between;
            refused(&s, why);
        }
        for (between, why) in [(exp(VC, FREE), "a step between reads the V cache"), (exp(FREE, POS), "a step between writes the position")]
        {
            // Between V's write (before it) and the attention.
            let mut s = prefill(64);
            s.insert(1, between);
            let l = lower_entry(&s, &LAYOUT, &|_| true).unwrap();
            assert!(l.absorbed.is_empty(), "{why}: {:?}", l.absorbed);
        }
        let i64 = DType::I64;
        let mut s = prefill(64);
        s[3] = write(KC, RK, POS + 256, 64, i64);
        refused(&s, "K's write at another position");
        s = prefill(64);
        s[3] = write(KC, FREE, POS, 64, i64);
        refused(&s, "K's write copies other rows than the attention's keys");
        s = prefill(64);
        s.remove(3);
        refused(&s, "no K write");
        s = prefill(64);
        s[1] = attention(32, 64, OUT);
        refused(&s, "fewer query rows than keys: the q tiles cover half of them");
        s = prefill(72);
        refused(&s, "head dim 72: a load may choose a variant, which has no storing entry");
        s = prefill(64);
        s[1] = attention(SK, 64, VC + 4096);
        assert!(lower_entry(&s, &LAYOUT, &|_| true).unwrap().absorbed.is_empty(), "the output takes bytes of the V cache");
        s = prefill(64);
        s[1] = attention(SK, 64, POS);
        assert!(lower_entry(&s, &LAYOUT, &|_| true).unwrap().absorbed.is_empty(), "the output takes the position's bytes");
    }

    #[test]
    fn a_module_without_the_entry_keeps_the_write_launches() {
        let steps = prefill(256);
        let names = |w: &[Vec<Work>]| -> Vec<String> {
            w.iter().flat_map(|w| kernels(w)).map(|k| k.kernel.clone()).filter(|k| !k.starts_with("fused_")).collect()
        };
        // A CUBIN from before the entry: the writes as one `_x2` launch.
        let l = lower_entry(&steps, &LAYOUT, &|k| !k.starts_with("attn_mma_new_")).unwrap();
        assert!(l.absorbed.is_empty());
        assert_eq!(names(&l.work), ["attn_mma_bf16_d256", "write_rows_b2_i64_x2"]);
        // Fusion off: no `_x2` launch either.
        let l = lower_entry(&steps, &LAYOUT, &|k| !fusing(k)).unwrap();
        assert!(l.absorbed.is_empty());
        assert_eq!(names(&l.work), ["write_rows_b2_i64", "attn_mma_bf16_d256", "write_rows_b2_i64"]);
        assert!(fusing("attn_mma_new_bf16_d256") && super::super::optional_kernel("attn_mma_new_f16_d64"));
    }
}
