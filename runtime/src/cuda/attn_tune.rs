//! The tensor-core prefill's variants chosen per card and shape (issue 15): the default
//! `attn_mma_<t>_d<D>` or one of kiln-kernels' [`AttnVariant`]s (`attention_mma.cuh`: 128
//! query rows per block, a ring of three K/V stages, the head dim unpadded, vector stores,
//! 32-row key tiles), which take the same parameter block and differ in kernel, grid and
//! shared memory only.
//!
//! The choice comes from the artifact's tuning table for this card ([`kiln_graph::tuning`],
//! kernel `attention`, shape [`AttentionShape`], choice `default` or the variant's tag): the
//! lowering of a step ([`lower_step_on`]) and `kiln inspect` ([`plan_lines`]) apply it with no
//! GPU, and a load applies it to its launches. With `KILN_CUDA_TUNE=attention` a load measures
//! the shapes the table lacks: each variant first runs on random queries, keys and values
//! beside the default kernel, and a variant whose output differs beyond the dtype's rounding
//! (or leaves an element unwritten) is REJECTED (reported, never timed, never chosen); the rest
//! are timed as the GEMMs are and the fastest kept. The choices measured go to
//! `KILN_CUDA_TUNING_OUT` with the GEMMs'. A shape with no entry keeps the default kernel.

use super::exec::{CudaExec, Item};
use super::lower::{self, Launch, Layout, Work};
use crate::error::{Result, RuntimeError};
use cudarc::driver::result as dr;
use kiln_graph::program::{Program, Slot, Step};
use kiln_graph::tuning::{self, AttentionShape, TuningEntry};
use kiln_graph::{DType, MaskKind, Op};
use kiln_kernels::cuda::attn::{attn_variants, AttnVariant};
use std::collections::BTreeSet;

/// Launches per timing graph.
const LAUNCHES: usize = 10;

fn err(msg: impl Into<String>) -> RuntimeError {
    RuntimeError::Unsupported { backend: "cuda".into(), msg: msg.into() }
}

fn drv<T>(what: &str, r: std::result::Result<T, dr::DriverError>) -> Result<T> {
    r.map_err(|e| err(format!("{what}: {e:?}")))
}

/// A prefill step on the tensor-core kernel: its shape key, dtype suffix and head dim, where
/// variants exist for it.
fn prefill_of(s: &Step) -> Option<(AttentionShape, &'static str, usize)> {
    let Op::Attention(att) = &s.op else { return None };
    let (_, d, v) = AttnVariant::of_kernel(&s.kernel)?;
    if !v.is_default() || attn_variants(d).is_empty() || s.inputs.len() < 3 {
        return None;
    }
    let (q, k) = (&s.inputs[0].ty, &s.inputs[1].ty);
    let (t, dtype) = match q.dtype {
        DType::BF16 => ("bf16", DType::BF16),
        DType::F16 => ("f16", DType::F16),
        _ => return None,
    };
    let mask = match att.mask {
        MaskKind::None => "none",
        MaskKind::Causal { .. } => "causal",
        MaskKind::SlidingWindow { .. } => "sliding",
        MaskKind::Additive => "additive",
        MaskKind::Positions(_) => "positions",
    };
    let (&[batch, sq, hq, d], &[_, sk, hkv, _]) = (q.shape.as_slice(), k.shape.as_slice()) else { return None };
    let shape = AttentionShape { batch, sq, hq, d, sk, hkv, dtype, mask: mask.into(), softcap: att.softcap.is_some() };
    Some((shape, t, d))
}

/// The variant the tuning table `entries` names for step `s` on `card`, where it is one kiln
/// has for the step's head dim (the default kernel is `None`).
pub fn tabled(s: &Step, entries: &[TuningEntry], card: &str) -> Option<AttnVariant> {
    let (shape, _, d) = prefill_of(s)?;
    let e = tuning::lookup(entries, card, "attention", &shape.key())?;
    AttnVariant::parse(&e.choice).filter(|v| attn_variants(d).contains(v))
}

/// Makes a prefill launch of the default kernel (dtype suffix `t`, head dim `d`, `sq` query
/// rows) launch variant `v`: the same parameters, its kernel, module, grid and shared memory.
pub fn apply(l: &mut Launch, t: &str, d: usize, sq: usize, v: AttnVariant) {
    l.kernel = v.kernel(t, d);
    l.module = v.module(t);
    l.grid.0 = sq.div_ceil(v.bq()) as u32;
    l.smem = v.smem(d) as u32;
}

/// Makes `work` (step `s`'s lowered launches) run the prefill variant the tuning table
/// `entries` names for `card`, where it names one: its tensor-core launch becomes the variant's.
pub fn apply_tabled(s: &Step, work: &mut [Work], entries: &[TuningEntry], card: &str) {
    if let (Some(v), Some((shape, t, d))) = (tabled(s, entries, card), prefill_of(s)) {
        if let Some(Work::Kernel(launch)) = work.iter_mut().find(|w| matches!(w, Work::Kernel(l) if l.kernel.starts_with("attn_mma_"))) {
            apply(launch, t, d, shape.sq, v);
        }
    }
}

/// [`lower::lower_step`] on `card`: a prefill step runs the variant the tuning table names.
pub fn lower_step_on(s: &Step, l: &Layout, entries: &[TuningEntry], card: &str) -> std::result::Result<Vec<Work>, String> {
    let mut work = lower::lower_step(s, l)?;
    if let (Some(v), Some((shape, t, d))) = (tabled(s, entries, card), prefill_of(s)) {
        if let Some(Work::Kernel(launch)) = work.first_mut() {
            apply(launch, t, d, shape.sq, v);
        }
    }
    Ok(work)
}

/// The variant modules the program's tuning table makes a load on some card launch.
pub fn tabled_modules(p: &Program) -> BTreeSet<String> {
    let cards: BTreeSet<&str> = p.tuning.iter().filter(|e| e.kernel == "attention").map(|e| e.card.as_str()).collect();
    let mut out = BTreeSet::new();
    for s in p.entries.iter().flat_map(|e| &e.steps) {
        for card in &cards {
            if let (Some(v), Some((_, t, _))) = (tabled(s, &p.tuning, card), prefill_of(s)) {
                out.insert(v.module(t));
            }
        }
    }
    out
}

/// The variant modules a load measuring the program's prefill shapes launches.
pub fn tunable_modules(p: &Program) -> BTreeSet<String> {
    let steps = p.entries.iter().flat_map(|e| &e.steps);
    steps.filter_map(prefill_of).filter_map(|(_, t, d)| attn_variants(d).first().map(|v| v.module(t))).collect()
}

/// Whether `KILN_CUDA_TUNE` asks a load to measure the attention variants.
pub fn tuning_requested() -> bool {
    std::env::var("KILN_CUDA_TUNE").is_ok_and(|v| v.split(',').any(|x| x == "attention"))
}

/// Checks that every attention entry of a tuning table names a kernel kiln has: `default`, or
/// a variant instantiated for the shape's head dim and dtype.
pub fn check_table(entries: &[TuningEntry]) -> std::result::Result<(), String> {
    for (i, e) in entries.iter().enumerate().filter(|(_, e)| e.kernel == "attention") {
        let shape = AttentionShape::parse(&e.shape).ok_or_else(|| format!("entry {i}: attention shape \"{}\" unreadable", e.shape))?;
        let v = AttnVariant::parse(&e.choice).ok_or_else(|| format!("entry {i}: attention choice \"{}\" unreadable", e.choice))?;
        let half = matches!(shape.dtype, DType::BF16 | DType::F16);
        let exists = v.is_default() || (half && attn_variants(shape.d).contains(&v));
        if !exists {
            let have: Vec<String> = attn_variants(shape.d).iter().map(|v| v.tag()).collect();
            return Err(format!(
                "entry {i}: attention variant \"{}\" does not exist for {:?} head dim {} (kiln has: default{}{})",
                e.choice,
                shape.dtype,
                shape.d,
                if have.is_empty() || !half { "" } else { ", " },
                if half { have.join(", ") } else { String::new() }
            ));
        }
    }
    Ok(())
}

/// `kiln inspect`'s lines on the prefill kernels a load runs per card of the tuning table.
pub fn plan_lines(p: &Program) -> Vec<String> {
    let cards: BTreeSet<&str> = p.tuning.iter().filter(|e| e.kernel == "attention").map(|e| e.card.as_str()).collect();
    let mut lines = Vec::new();
    for card in cards {
        // (shape, kernel) -> steps, in first-seen order.
        let mut seen: Vec<(String, String, usize)> = Vec::new();
        for s in p.entries.iter().flat_map(|e| &e.steps) {
            let (Some((shape, t, d)), Some(v)) = (prefill_of(s), tabled(s, &p.tuning, card)) else { continue };
            let (key, kernel) = (shape.key(), v.kernel(t, d));
            match seen.iter_mut().find(|x| x.0 == key && x.1 == kernel) {
                Some(x) => x.2 += 1,
                None => seen.push((key, kernel, 1)),
            }
        }
        for (shape, kernel, n) in seen {
            let steps = if n == 1 { "step" } else { "steps" };
            lines.push(format!("attention on {card}: {n} {steps} of {shape} run {kernel} (tuning table)"));
        }
    }
    lines
}

/// One prefill shape of the loaded program: its key, dtype suffix, head dim, query rows and
/// the (entry, step, item) launches.
struct Group {
    shape: AttentionShape,
    t: &'static str,
    d: usize,
    members: Vec<(usize, usize, usize)>,
}

/// Random values in `[-1.4, 1.9)` (a fixed LCG), converted to `dt`.
fn random(count: usize, dt: DType, seed: u64) -> Vec<u8> {
    let mut state = seed;
    let vals: Vec<u8> = (0..count)
        .flat_map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.3 + 0.25).to_le_bytes()
        })
        .collect();
    crate::tensor::convert(DType::F32, dt, &vals)
}

impl CudaExec {
    /// The program's prefill launches with variants, grouped by shape (first-seen order).
    fn attention_groups(&self) -> Vec<Group> {
        let mut groups: Vec<Group> = Vec::new();
        for (e, steps) in self.items.iter().enumerate() {
            for (i, items) in steps.iter().enumerate() {
                let Some((shape, t, d)) = prefill_of(&self.program.entries[e].steps[i]) else { continue };
                let Some(j) = items.iter().position(|x| matches!(x, Item::Kernel { launch, .. } if launch.kernel.starts_with("attn_mma_")))
                else {
                    continue;
                };
                match groups.iter_mut().find(|g| g.shape == shape) {
                    Some(g) => g.members.push((e, i, j)),
                    None => groups.push(Group { shape, t, d, members: vec![(e, i, j)] }),
                }
            }
        }
        groups
    }

    /// The launch at `at` as variant `v`.
    fn variant_item(&self, at: (usize, usize, usize), g: &Group, v: AttnVariant) -> Result<Item> {
        let Item::Kernel { launch, .. } = &self.items[at.0][at.1][at.2] else { return Err(err("not a kernel launch")) };
        let mut l = launch.clone();
        apply(&mut l, g.t, g.d, g.shape.sq, v);
        let f = *self.funcs.get(&l.kernel).ok_or_else(|| err(format!("kernel {} is in no loaded module", l.kernel)))?;
        Ok(Item::Kernel { f, launch: l })
    }

    /// Chooses each prefill shape's kernel (see the module's documentation); measured choices
    /// are added to `measured`.
    pub(super) fn choose_attention(&mut self, card: &str, measured: &mut Vec<TuningEntry>, verbose: bool) -> Result<()> {
        let tune = tuning_requested();
        for g in self.attention_groups() {
            let key = g.shape.key();
            let v = match tuning::lookup(&self.program.tuning, card, "attention", &key) {
                Some(e) => match AttnVariant::parse(&e.choice).filter(|v| v.is_default() || attn_variants(g.d).contains(v)) {
                    Some(v) => {
                        if verbose {
                            eprintln!("kiln cuda: attention {key}: {} from the tuning table (not timed)", v.kernel(g.t, g.d));
                        }
                        v
                    }
                    None => {
                        eprintln!(
                            "kiln cuda: attention {key}: the tuning table's \"{}\" is no variant of this kiln: the default kernel",
                            e.choice
                        );
                        AttnVariant::default()
                    }
                },
                None if tune => match self.measure_attention(&g, verbose)? {
                    Some((v, us)) => {
                        let (card, shape) = (card.to_string(), key.clone());
                        let us = Some((us * 10.0).round() / 10.0);
                        measured.push(TuningEntry { card, kernel: "attention".into(), shape, choice: v.tag(), us });
                        v
                    }
                    None => AttnVariant::default(),
                },
                None => AttnVariant::default(),
            };
            if !v.is_default() {
                for &at in &g.members {
                    self.items[at.0][at.1][at.2] = self.variant_item(at, &g, v)?;
                }
            }
        }
        Ok(())
    }

    /// Checks every variant against the default kernel on random inputs and times those that
    /// agree: `Some((fastest, its microseconds per call))`, or `None` where the shape cannot
    /// be measured in place (a mask read from memory, a weight operand) or nothing ran.
    fn measure_attention(&self, g: &Group, verbose: bool) -> Result<Option<(AttnVariant, f64)>> {
        let key = g.shape.key();
        if !matches!(g.shape.mask.as_str(), "none" | "causal" | "sliding") {
            if verbose {
                eprintln!("kiln cuda: attention {key}: not measured (its mask is read from memory)");
            }
            return Ok(None);
        }
        let writable = |s: &Slot| matches!(s, Slot::Arena { .. } | Slot::State(_));
        let Some(&at) = g.members.iter().find(|&&(e, i, _)| {
            let step = &self.program.entries[e].steps[i];
            step.inputs.iter().take(3).all(|o| writable(&o.slot)) && writable(&step.output.slot)
        }) else {
            return Ok(None);
        };
        let default = self.items[at.0][at.1][at.2].clone();
        let Item::Kernel { launch, .. } = &default else { return Ok(None) };
        let addr = |i: usize| launch.params.get(i * 8..i * 8 + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
        let (Some(q), Some(k), Some(v), Some(out)) = (addr(0), addr(1), addr(2), addr(4)) else { return Err(err("attention parameters")) };
        let s = &g.shape;
        let dt = s.dtype;
        let (nq, nkv) = (s.batch * s.sq * s.hq * s.d, s.batch * s.sk * s.hkv * s.d);
        let (bq, bkv) = ((nq * dt.size()) as u64, (nkv * dt.size()) as u64);
        if [(q, bq), (k, bkv), (v, bkv)].iter().any(|&(a, n)| a < out + bq && out < a + n) {
            return Ok(None); // the runs would overwrite their own inputs
        }
        drv("bind context", self.ctx.bind_to_thread())?;
        for (ptr, n, seed) in [(q, nq, 1u64), (k, nkv, 2), (v, nkv, 3)] {
            let bytes = random(n, dt, 0x9e37_79b9_7f4a_7c15 ^ seed);
            // SAFETY: q, k and v are the step's operands, of `n` elements each; the output is
            // another buffer (the plan keeps a step's inputs live while it writes).
            drv("attention check upload", unsafe { dr::memcpy_htod_sync(ptr, &bytes[..]) })?;
        }
        let run = |item: &Item| -> Result<Vec<f32>> {
            // All ones: a NaN in both half types, so an element a kernel leaves unwritten fails.
            // SAFETY: the output operand holds `nq` elements.
            drv("attention check clear", unsafe { dr::memset_d8_async(out, 0xff, nq * dt.size(), self.stream.cu_stream()) })?;
            self.issue(item)?;
            drv("sync", self.stream.synchronize())?;
            let mut o = vec![0u8; nq * dt.size()];
            // SAFETY: as above.
            drv("attention check download", unsafe { dr::memcpy_dtoh_sync(&mut o[..], out) })?;
            Ok(crate::tensor::convert(dt, DType::F32, &o).chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
        };
        let want = run(&default)?;
        if want.iter().any(|x| !x.is_finite()) {
            eprintln!("kiln cuda: attention {key}: the default kernel's output is not finite: not measured");
            return Ok(None);
        }
        // A few roundings of the output dtype (the variants reorder no sum but the k8 tail).
        let tol = if dt == DType::BF16 { 1.6e-2 } else { 2e-3 };
        let mut candidates = vec![(AttnVariant::default(), default.clone())];
        for var in attn_variants(g.d) {
            let item = self.variant_item(at, g, var)?;
            let got = run(&item)?;
            let worst = want
                .iter()
                .zip(&got)
                .map(|(a, b)| if b.is_finite() { (a - b).abs() / (1.0 + a.abs()) } else { f32::INFINITY })
                .fold(0.0f32, f32::max);
            if worst > tol {
                eprintln!(
                    "kiln cuda: attention {key}: variant {} REJECTED (differs from the default kernel by {worst:.3e} > {tol:.1e})",
                    var.kernel(g.t, g.d)
                );
                continue;
            }
            candidates.push((var, item));
        }
        let flops = 4.0 * (s.batch * s.hq * s.sq * s.sk * s.d) as f64;
        let mut times = Vec::new();
        for (var, item) in &candidates {
            let t = self.time_issued(|| (0..LAUNCHES).try_for_each(|_| self.issue(item)), LAUNCHES)?;
            times.push((*var, t));
        }
        let best = times.iter().filter_map(|&(v, t)| Some((v, t?))).min_by(|a, b| a.1.total_cmp(&b.1));
        if verbose {
            let each: Vec<String> = times
                .iter()
                .map(|(v, t)| match t {
                    // The rate of the dense product (a mask skips part of it).
                    Some(t) if s.mask == "none" => format!("{} {:.1} us ({:.0} TFLOP/s)", v.tag(), t * 1e6, flops / t / 1e12),
                    Some(t) => format!("{} {:.1} us", v.tag(), t * 1e6),
                    None => format!("{} failed", v.tag()),
                })
                .collect();
            let won = best.map_or("none ran".to_string(), |(v, _)| v.kernel(g.t, g.d));
            eprintln!("kiln cuda: attention {key} (x{}): {} -> {won}", g.members.len(), each.join(", "));
        }
        Ok(best.map(|(v, t)| (v, t * 1e6)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_graph::program::{Entry, Operand};
    use kiln_graph::{Attention, TensorType};

    const H200: &str = "NVIDIA H200";
    const SHAPE: &str = "32x256x16x72 kv 256x16 BF16 none";

    fn operand(offset: usize, shape: &[usize]) -> Operand {
        let ty = TensorType::new(DType::BF16, shape.to_vec());
        Operand { slot: Slot::Arena { offset, bytes: ty.bytes() }, ty }
    }

    /// So400m's attention at 224 px, batch 32 (head dim 72, no mask).
    fn so400m_step() -> Step {
        let x = [32, 256, 16, 72];
        let op = Op::Attention(Attention { scale: 72f32.powf(-0.5), softcap: None, mask: MaskKind::None });
        let bytes = 32 * 256 * 16 * 72 * 2;
        let inputs = vec![operand(0, &x), operand(bytes, &x), operand(2 * bytes, &x)];
        let tys: Vec<TensorType> = inputs.iter().map(|o| o.ty.clone()).collect();
        let kernel = lower::kernel_for(&op, &tys, &tys[0]).unwrap();
        Step { node: 0, op, kernel, inputs, output: operand(3 * bytes, &x) }
    }

    fn entry(card: &str, shape: &str, choice: &str) -> TuningEntry {
        TuningEntry { card: card.into(), kernel: "attention".into(), shape: shape.into(), choice: choice.into(), us: None }
    }

    fn program(tuning: Vec<TuningEntry>) -> Program {
        let s = so400m_step();
        let arena_bytes = 4 * s.output.ty.bytes();
        let e = Entry {
            name: "forward".into(),
            inputs: vec![],
            outputs: vec![],
            steps: vec![s.clone(), s],
            arena_bytes,
            plan: Default::default(),
        };
        Program {
            model: "t".into(),
            backend: "cuda".into(),
            source: String::new(),
            weights: vec![],
            constants: vec![],
            entries: vec![e],
            states: vec![],
            binaries: vec![],
            weight_sets: vec![],
            tuning,
        }
    }

    fn launch_of(w: &[Work]) -> &Launch {
        match w {
            [Work::Kernel(l)] => l,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_lowering_runs_the_variant_the_table_names_for_the_card() {
        let s = so400m_step();
        assert_eq!(s.kernel, "attn_mma_bf16_d72");
        assert_eq!(prefill_of(&s).unwrap().0.key(), SHAPE);
        let l = Layout::default();
        let tuning = vec![entry(H200, SHAPE, "q128_s3"), entry("NVIDIA H100 80GB HBM3", SHAPE, "np")];
        let plain = lower::lower_step(&s, &l).unwrap();
        let base = launch_of(&plain);
        assert_eq!((base.kernel.as_str(), base.grid, base.smem), ("attn_mma_bf16_d72", (4, 16, 32), (64 + 4 * 64) * 88 * 2));
        let w = lower_step_on(&s, &l, &tuning, H200).unwrap();
        let v = launch_of(&w);
        assert_eq!((v.kernel.as_str(), v.module.as_str()), ("attn_mma_bf16_d72_q128_s3", "attention_var_bf16"));
        assert_eq!((v.grid, v.smem), ((2, 16, 32), (128 + 3 * 64) * 88 * 2));
        assert_eq!((&v.params, &v.relocs), (&base.params, &base.relocs), "the same parameter block");
        let np = lower_step_on(&s, &l, &tuning, "NVIDIA H100 80GB HBM3").unwrap();
        assert_eq!((launch_of(&np).kernel.as_str(), launch_of(&np).grid), ("attn_mma_bf16_d72_np", (4, 16, 32)));
        // Another card, another shape, `default`, or a variant this build lacks: the default kernel.
        for (card, t) in [("NVIDIA A100", tuning.clone()), (H200, vec![entry(H200, "32x256x16x72 kv 256x16 BF16 causal", "s3")])] {
            assert_eq!(lower_step_on(&s, &l, &t, card).unwrap(), plain);
        }
        for choice in ["default", "k32", "q128"] {
            assert_eq!(lower_step_on(&s, &l, &[entry(H200, SHAPE, choice)], H200).unwrap(), plain, "{choice}");
        }
    }

    #[test]
    fn inspect_and_the_kernel_plan_follow_the_table() {
        let none = program(vec![]);
        assert!(plan_lines(&none).is_empty());
        assert!(tabled_modules(&none).is_empty());
        assert_eq!(tunable_modules(&none).into_iter().collect::<Vec<_>>(), ["attention_var_bf16"]);
        let plan = super::super::plan::kernel_plan(&none, "sm_90a").unwrap();
        assert!(plan.needed.contains("attention") && !plan.needed.iter().any(|m| m.starts_with("attention_var")), "{:?}", plan.needed);
        let p = program(vec![entry(H200, SHAPE, "q128_s3_np_vs")]);
        assert_eq!(plan_lines(&p), [format!("attention on {H200}: 2 steps of {SHAPE} run attn_mma_bf16_d72_q128_s3_np_vs (tuning table)")]);
        let plan = super::super::plan::kernel_plan(&p, "sm_90a").unwrap();
        assert!(plan.needed.contains("attention_var_bf16") && !plan.needed.contains("attention_var_f16"), "{:?}", plan.needed);
        assert!(super::super::plan::load_plan(&p, None).contains("run attn_mma_bf16_d72_q128_s3_np_vs"));
    }

    #[test]
    fn a_table_naming_a_missing_variant_is_refused() {
        assert!(check_table(&[entry(H200, SHAPE, "q128_s3"), entry(H200, "1x1024x8x256 kv 1024x4 BF16 causal softcap", "default")]).is_ok());
        let e = check_table(&[entry(H200, SHAPE, "s3"), entry(H200, SHAPE, "k32")]).unwrap_err();
        assert!(e.starts_with("entry 1: attention variant \"k32\" does not exist for BF16 head dim 72 (kiln has: default, s3, np"), "{e}");
        let e = check_table(&[entry(H200, "1x1024x8x256 kv 1024x4 BF16 causal", "s3")]).unwrap_err();
        assert!(e.contains("head dim 256 (kiln has: default)"), "{e}");
        let e = check_table(&[entry(H200, "32x256x16x72 kv 256x16 F32 none", "np")]).unwrap_err();
        assert!(e.contains("F32 head dim 72 (kiln has: default)"), "{e}");
    }

    #[test]
    fn the_table_format_knows_every_variant() {
        assert_eq!(tuning::ATTENTION_FLAGS, kiln_kernels::cuda::attn::ATTN_FLAGS);
        for &(_, tag) in kiln_kernels::cuda::attn::ATTN_VARIANTS {
            assert!(tuning::attention_choice_ok(tag), "{tag}");
        }
    }
}
