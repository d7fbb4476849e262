//! Attention's launches: the tensor-core prefill (`attn_mma_*`), or the row kernel split over
//! the keys (`attn_rows_*`, then `attn_combine_*` merging the splits). Where the loaded
//! modules hold it, [`one_launch`] runs the split attention as one `attn_rows1_*` launch
//! (issue 16): the last block to finish for an output row merges that row, counting the
//! finished splits in the layout's `counters` region ([`Layout::counters`]).

use super::{float_suffix, launch, off_of, Layout, Work, SMS};
use crate::geometry::AttentionGeometry;
use kiln_graph::program::Step;
use kiln_graph::{Attention, DType, MaskKind};
use kiln_kernels::cuda::{self as kc, AttnParams};

/// How one attention step runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct AttnPlan {
    /// The tensor-core prefill (else the row kernel).
    pub mma: bool,
    /// Splits of the keys (1: no split).
    pub splits: usize,
    /// Bytes of split-K partials (f32 `B*Sq*Hq*splits*(Dv+2)`), 0 without a split.
    pub scratch: usize,
    /// Bytes of `attn_rows1`'s counters (u32 per output row `B*Sq*Hq`), 0 without a split.
    pub counters: usize,
}

/// The plan of attention step `s`.
pub(super) fn attention_plan(s: &Step) -> Result<AttnPlan, String> {
    let q = &s.inputs[0].ty;
    let g = AttentionGeometry::new(&q.shape, &s.inputs[1].ty.shape, &s.inputs[2].ty.shape);
    let (b, sq, hq, d, sk, dv) = (g.batch, g.sq, g.hq, g.d, g.sk, g.dv);
    let half = matches!(q.dtype, DType::BF16 | DType::F16);
    let mma = half && sq > 1 && d == dv && kc::MMA_HEAD_DIMS.contains(&d);
    if mma {
        return Ok(AttnPlan { mma: true, splits: 1, scratch: 0, counters: 0 });
    }
    if d > kc::ROWS_MAX_D || dv > kc::ROWS_MAX_D {
        return Err(format!("head dims {d}/{dv} exceed the CUDA attention's {}", kc::ROWS_MAX_D));
    }
    let rows = b * sq * hq;
    let splits = (2 * SMS).div_ceil(rows.max(1)).clamp(1, sk.div_ceil(64).max(1));
    let (scratch, counters) = if splits > 1 { (rows * splits * (dv + 2) * 4, rows * 4) } else { (0, 0) };
    Ok(AttnPlan { mma: false, splits, scratch, counters })
}

/// Attention: the tensor-core prefill, or the row kernel (split-K, then the combine). With a
/// split, the parameters hold the counters' address too (the two-launch kernels ignore it), so
/// [`one_launch`] only renames the first launch.
pub(super) fn lower_attention(s: &Step, l: &Layout, ins: &[u64], out: u64, att: &Attention) -> Result<Vec<Work>, String> {
    let g = AttentionGeometry::new(&s.inputs[0].ty.shape, &s.inputs[1].ty.shape, &s.inputs[2].ty.shape);
    let AttnPlan { mma, splits, .. } = attention_plan(s)?;
    let (mask_kind, q_offset, window) = match att.mask {
        MaskKind::None => (0, 0, 0),
        MaskKind::Causal { q_offset } => (1, q_offset, 0),
        MaskKind::SlidingWindow { q_offset, window } => (2, q_offset, window),
        MaskKind::Additive => (3, 0, 0),
        MaskKind::Positions(pm) => (4, 0, pm.window.unwrap_or(0)),
    };
    // A position mask's operands follow q, k, v: the start, then keep and prefix if present.
    let (mut pos, mut keep, mut prefix) = (0, 0, 0);
    if let MaskKind::Positions(pm) = att.mask {
        let at = |i: usize| ins.get(i).copied().ok_or_else(|| format!("a position mask without its input {i}"));
        pos = at(3)?;
        if pm.padding {
            keep = at(4)?;
        }
        if pm.prefix {
            prefix = at(4 + usize::from(pm.padding))?;
        }
    }
    let split = splits > 1;
    let p = AttnParams {
        q: ins[0],
        k: ins[1],
        v: ins[2],
        mask: if mask_kind == 3 { ins[3] } else { 0 },
        out,
        partial: if split { l.scratch as u64 } else { 0 },
        pos,
        keep,
        prefix,
        batch: g.batch as i32,
        sq: g.sq as i32,
        sk: g.sk as i32,
        hq: g.hq as i32,
        hkv: g.hkv as i32,
        d: g.d as i32,
        dv: g.dv as i32,
        mask_kind,
        q_offset: q_offset as i32,
        window: window as i32,
        splits: splits as i32,
        pad: 0,
        scale: att.scale,
        softcap: att.softcap.unwrap_or(0.0),
        counters: if split { l.counters as u64 } else { 0 },
        // Set where the launch also does decode's cache writes (`super::kv_write`).
        ..AttnParams::default()
    };
    let mut relocs = vec![off_of(&p, &p.q), off_of(&p, &p.k), off_of(&p, &p.v), off_of(&p, &p.out)];
    if mask_kind == 3 {
        relocs.push(off_of(&p, &p.mask));
    }
    // Only present operands are relocated: an absent one stays 0, which the kernel tests.
    if let MaskKind::Positions(pm) = att.mask {
        relocs.push(off_of(&p, &p.pos));
        if pm.padding {
            relocs.push(off_of(&p, &p.keep));
        }
        if pm.prefix {
            relocs.push(off_of(&p, &p.prefix));
        }
    }
    if split {
        relocs.push(off_of(&p, &p.partial));
        relocs.push(off_of(&p, &p.counters));
    }
    let t = float_suffix(s.output.ty.dtype)?;
    if mma {
        let grid = (g.sq.div_ceil(kc::MMA_BQ) as u32, g.hq as u32, g.batch as u32);
        return Ok(vec![launch("attention", format!("attn_mma_{t}_d{}", g.d), grid, 128, kc::mma_smem(g.d) as u32, &p, &relocs)]);
    }
    let grid = ((g.sq * g.hq) as u32, g.batch as u32, splits as u32);
    let mut w = vec![launch("attention", format!("attn_rows_{t}"), grid, 128, 0, &p, &relocs)];
    if split {
        w.push(launch("attention", format!("attn_combine_{t}"), (grid.0, grid.1, 1), 128, 0, &p, &relocs));
    }
    Ok(w)
}

/// The one-launch entry of the row kernel `attn_rows_<t>`, if `kernel` is one.
pub fn one_launch_kernel(kernel: &str) -> Option<String> {
    kernel.strip_prefix("attn_rows_").map(|t| format!("attn_rows1_{t}"))
}

/// Runs each split attention (`attn_rows_<t>` then `attn_combine_<t>`, one step's work in
/// `work`) as one `attn_rows1_<t>` launch with the same grid and parameters, where
/// `has(kernel)` says it may be launched (a CUBIN stored before it lacks it). Returns how
/// many steps it changed.
pub fn one_launch(work: &mut [Vec<Work>], has: &dyn Fn(&str) -> bool) -> usize {
    let mut changed = 0;
    for w in work.iter_mut() {
        let [Work::Kernel(rows), Work::Kernel(combine)] = w.as_slice() else { continue };
        let (Some(t), Some(one)) = (rows.kernel.strip_prefix("attn_rows_"), one_launch_kernel(&rows.kernel)) else { continue };
        if combine.kernel != format!("attn_combine_{t}") || !has(&one) {
            continue;
        }
        let mut k = rows.clone();
        k.kernel = one;
        *w = vec![Work::Kernel(k)];
        changed += 1;
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::super::tests::{arena, kernels, tt};
    use super::super::{kernel_for, layout, lower_entry, lower_step, optional_kernel, with_kernel, Launch};
    use super::*;
    use kiln_graph::program::{Entry, Program};
    use kiln_graph::Op;

    /// Decode attention, bf16: q `[1, 1, hq, 256]` against a `[1, sk, 4, 256]` cache.
    fn decode(hq: usize, sk: usize) -> Step {
        let att = Op::Attention(Attention { scale: 0.1, softcap: Some(50.0), mask: MaskKind::Causal { q_offset: sk - 1 } });
        let q = tt(DType::BF16, &[1, 1, hq, 256]);
        let kv = tt(DType::BF16, &[1, sk, 4, 256]);
        with_kernel(Step {
            node: 0,
            op: att,
            kernel: String::new(),
            inputs: vec![arena(0, q.clone()), arena(4096, kv.clone()), arena(1 << 22, kv)],
            output: arena(1 << 23, q),
        })
    }

    fn read(k: &Launch, at: usize) -> u64 {
        u64::from_le_bytes(k.params[at..at + 8].try_into().unwrap())
    }

    const LAYOUT: Layout = Layout {
        arena: 0,
        arena_bytes: 0,
        weights: Vec::new(),
        constants: Vec::new(),
        scratch: 1 << 24,
        scratch_bytes: 1 << 20,
        counters: (1 << 24) + (1 << 20),
        counters_bytes: 256,
        workspace: 0,
        error_flag: 0,
        total: 0,
        rotations: Vec::new(),
    };

    #[test]
    fn attention_picks_tensor_cores_for_half_prefill_and_rows_for_decode() {
        let att = Op::Attention(Attention { scale: 0.1, softcap: Some(50.0), mask: MaskKind::Causal { q_offset: 0 } });
        let q = tt(DType::BF16, &[1, 1024, 8, 256]);
        let kv = tt(DType::BF16, &[1, 1024, 4, 256]);
        assert_eq!(kernel_for(&att, &[q.clone(), kv.clone(), kv.clone()], &q).unwrap(), "attn_mma_bf16_d256");
        let q1 = tt(DType::BF16, &[1, 1, 8, 256]);
        assert_eq!(kernel_for(&att, &[q1.clone(), kv.clone(), kv], &q1).unwrap(), "attn_rows_bf16");
        let w = lower_step(&decode(8, 1024), &LAYOUT).unwrap();
        let k = kernels(&w);
        assert_eq!(k.len(), 2, "split-K: partials, then the combine");
        assert_eq!((k[0].kernel.as_str(), k[1].kernel.as_str()), ("attn_rows_bf16", "attn_combine_bf16"));
        assert!(k[0].grid.2 > 1);
        assert_eq!(k[0].relocs.len(), 6);
        assert_eq!(k[0].params, k[1].params);
    }

    #[test]
    fn a_split_attention_is_one_launch_where_the_kernel_is_loaded() {
        // Gemma 2 2B decode's shape: 8 query heads, a cache of 1056 keys.
        let s = decode(8, 1056);
        let plan = attention_plan(&s).unwrap();
        assert!(plan.splits > 1, "{plan:?}");
        let two = lower_step(&s, &LAYOUT).unwrap();
        let one = lower_entry(std::slice::from_ref(&s), &LAYOUT, &|_| true).unwrap().work;
        let (two, one) = (kernels(&two), kernels(&one[0]));
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].kernel, "attn_rows1_bf16");
        // The row kernel's grid and parameters, the counters' address among them.
        assert_eq!(
            (one[0].grid, one[0].block, &one[0].params, &one[0].relocs),
            (two[0].grid, two[0].block, &two[0].params, &two[0].relocs)
        );
        let (counters, partial) = (std::mem::offset_of!(AttnParams, counters), std::mem::offset_of!(AttnParams, partial));
        assert!(one[0].relocs.contains(&counters) && one[0].relocs.contains(&partial));
        assert_eq!((read(one[0], counters), read(one[0], partial)), (LAYOUT.counters as u64, LAYOUT.scratch as u64));
        // A CUBIN without the one-launch kernel: the two launches.
        let old = lower_entry(std::slice::from_ref(&s), &LAYOUT, &|k| !k.starts_with("attn_rows1_")).unwrap().work;
        assert_eq!(kernels(&old[0]).iter().map(|k| k.kernel.as_str()).collect::<Vec<_>>(), ["attn_rows_bf16", "attn_combine_bf16"]);
    }

    #[test]
    fn every_row_kernel_has_its_one_launch_entry_which_a_module_may_lack() {
        let att = kc::modules().into_iter().find(|m| m.name == "attention").unwrap();
        let rows: Vec<&str> =
            att.kernels.iter().map(|k| k.name.as_str()).filter(|k| k.starts_with("attn_rows_") && !k.contains("_new_")).collect();
        assert_eq!(rows.len(), 3, "{rows:?}");
        let listed = |k: &str| att.kernels.iter().any(|x| x.name == k);
        for k in rows {
            let one = one_launch_kernel(k).unwrap();
            assert!(listed(&one), "{one} is not in the attention module");
            assert!(optional_kernel(&one) && !optional_kernel(k), "{k}");
            // Each also has the entry that stores decode's new K and V rows.
            for r in [k, one.as_str()] {
                let new = super::super::kv_write::new_rows_kernel(r).unwrap();
                assert!(listed(&new) && optional_kernel(&new), "{new}");
            }
        }
        assert!(!optional_kernel("attn_combine_bf16") && one_launch_kernel("attn_combine_bf16").is_none());
    }

    #[test]
    fn an_unsplit_attention_is_unchanged() {
        // 132 query heads fill the SMs twice over at one split.
        let s = decode(264, 1056);
        assert_eq!(attention_plan(&s).unwrap(), AttnPlan { mma: false, splits: 1, scratch: 0, counters: 0 });
        let one = lower_entry(std::slice::from_ref(&s), &LAYOUT, &|_| true).unwrap().work;
        let k = kernels(&one[0]);
        assert_eq!((k.len(), k[0].kernel.as_str(), k[0].grid.2), (1, "attn_rows_bf16", 1));
        assert_eq!((read(k[0], std::mem::offset_of!(AttnParams, counters)), k[0].relocs.len()), (0, 4));
    }

    fn program(steps: Vec<Step>) -> Program {
        let e = Entry { name: "decode".into(), inputs: vec![], outputs: vec![], steps, arena_bytes: 1 << 24, plan: Default::default() };
        let mut p = Program::new("t", "cuda", "");
        p.entries.push(e);
        p
    }

    #[test]
    fn the_counters_have_a_region_of_their_own_where_attention_splits() {
        // Two split attentions (8 and 16 query heads): a u32 per row of the larger.
        let l = layout(&program(vec![decode(8, 1056), decode(16, 1056)])).unwrap();
        assert_eq!(l.counters_bytes, attention_plan(&decode(16, 1056)).unwrap().counters);
        assert_eq!(l.counters_bytes, 16 * 4);
        let regions = [
            (l.arena, l.arena + l.arena_bytes),
            (l.scratch, l.scratch + l.scratch_bytes),
            (l.counters, l.counters + l.counters_bytes),
            (l.workspace, l.workspace + super::super::GEMM_WORKSPACE),
            (l.error_flag, l.total),
        ];
        for (i, a) in regions.iter().enumerate() {
            assert!(a.0 < a.1 && a.1 <= l.total, "region {i}: {a:?} of {}", l.total);
            for b in &regions[i + 1..] {
                assert!(a.1 <= b.0 || b.1 <= a.0, "{a:?} overlaps {b:?}");
            }
        }
        // Lowered against it, the one launch counts in that region.
        let w = lower_entry(&program(vec![decode(8, 1056)]).entries[0].steps, &l, &|_| true).unwrap().work;
        assert_eq!(read(kernels(&w[0])[0], std::mem::offset_of!(AttnParams, counters)), l.counters as u64);
        // No attention splits: no counters.
        assert_eq!(layout(&program(vec![decode(264, 1056)])).unwrap().counters_bytes, 0);
    }
}
