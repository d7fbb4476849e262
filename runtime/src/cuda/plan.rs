//! What a cuda load of an artifact will do, worked out with no GPU: which CUDA modules its
//! launches need, which of them the artifact holds as CUBINs for an architecture (the rest
//! NVRTC compiles at load), and what the weights' upload moves. `kiln inspect` prints it;
//! [`CudaBackend::load`](super::CudaBackend) uses [`kernel_plan`] to compile only what the
//! artifact lacks.

use super::lower;
use crate::weights::WeightStore;
use kiln_graph::program::Program;
use std::collections::BTreeSet;

/// The CUDA modules a load of a program needs, and which of them lack a CUBIN for one
/// architecture.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelPlan {
    /// The architecture asked about (`sm_90a`).
    pub arch: String,
    /// Every module a load loads: kiln's hand-written modules (the executor may launch any of
    /// them: GEMV, the state row gather, the norm variants; the prefill's variant modules only
    /// where the tuning table names one) and each fused region's module.
    pub needed: BTreeSet<String>,
    /// Those the artifact holds no CUBIN of for `arch`: compiled with NVRTC at load.
    pub missing: BTreeSet<String>,
}

impl KernelPlan {
    /// Whether a load on a GPU of this architecture compiles nothing.
    pub fn compiles_none(&self) -> bool {
        self.missing.is_empty()
    }
}

/// The modules `program` needs (the hand-written ones, its fused regions, and every module a
/// step's lowering launches, on the program as a load lays it out) and which of them the
/// artifact lacks as CUBINs for `arch`.
pub fn kernel_plan(program: &Program, arch: &str) -> Result<KernelPlan, String> {
    let all = kiln_kernels::cuda::modules().into_iter().map(|m| m.name);
    let mut needed: BTreeSet<String> = all.filter(|m| !kiln_kernels::cuda::on_demand(m)).collect();
    needed.extend(lower::regions(program)?.into_iter().map(|r| r.name));
    // The prefill variants the tuning table names for some card (`attn_tune`).
    needed.extend(super::attn_tune::tabled_modules(program));
    // The launches themselves, lowered as a load lowers them (states moved into the arena), so
    // a module the lowering names beyond the lists above is counted too.
    let (laid, _) = crate::states::states_in_arena(program);
    let layout = lower::layout(&laid)?;
    for e in &laid.entries {
        let work = lower::lower_entry(&e.steps, &layout, &|_| true).map_err(|(i, m)| format!("entry {} step {i}: {m}", e.name))?;
        for w in work.work.into_iter().flatten() {
            if let lower::Work::Kernel(l) = w {
                needed.insert(l.module);
            }
        }
    }
    let stored: BTreeSet<&str> =
        program.binaries.iter().filter(|b| b.backend == "cuda" && b.arch == arch && !b.code.is_empty()).map(|b| b.name.as_str()).collect();
    let missing = needed.iter().filter(|m| !stored.contains(m.as_str())).cloned().collect();
    Ok(KernelPlan { arch: arch.to_string(), needed, missing })
}

/// One paragraph saying what a cuda load of `program` from its checkpoint does: the weights
/// it maps and uploads (and converts, where the checkpoint's dtype differs: `store`, when the
/// checkpoint could be opened), then [`load_plan_with`]'s kernel lines.
pub fn load_plan(program: &Program, store: Option<&WeightStore>) -> String {
    let weights = crate::prepared::cuda::WeightsPlan { line: crate::prepared::cuda::plan(program, store), mapped: None };
    load_plan_with(program, &weights)
}

/// One paragraph saying what a cuda load of the artifact at `artifact` does: its weights (its
/// prepared file mapped and uploaded as stored where it has one and `use_prepared`, checked as
/// a load checks it; else the checkpoint), then [`load_plan_with`]'s kernel lines.
pub fn load_plan_for(artifact: &std::path::Path, program: &Program, use_prepared: bool) -> String {
    load_plan_with(program, &crate::prepared::cuda::weights_plan(artifact, program, use_prepared))
}

/// What a load does with `weights`, then the kernels it loads as stored CUBINs and compiles
/// with NVRTC per architecture held, and where its GEMM choices come from. A load that maps a
/// prepared file and compiles nothing on the first stored architecture is summed up first.
pub fn load_plan_with(program: &Program, weights: &crate::prepared::cuda::WeightsPlan) -> String {
    let mut lines = vec![format!("weights: {}", weights.line)];
    let mut archs: Vec<&str> = program.binaries.iter().filter(|b| b.backend == "cuda").map(|b| b.arch.as_str()).collect();
    archs.sort_unstable();
    archs.dedup();
    if archs.is_empty() {
        archs.push(super::DEFAULT_ARCH);
    }
    let first = kernel_plan(program, archs[0]).is_ok_and(|k| k.compiles_none());
    if let (Some((file, bytes)), true) = (&weights.mapped, first) {
        let sum = format!("map {file}, upload {bytes} bytes, convert none, compile none (on {})", archs[0]);
        lines.insert(0, sum);
    }
    for arch in archs {
        lines.push(match kernel_plan(program, arch) {
            Ok(k) if k.compiles_none() => {
                format!("kernels on {arch}: load {} modules as stored CUBINs; compile none", k.needed.len())
            }
            Ok(k) => {
                let some: Vec<&str> = k.missing.iter().take(4).map(String::as_str).collect();
                let more = if k.missing.len() > some.len() { format!(", ... ({} in all)", k.missing.len()) } else { String::new() };
                format!(
                    "kernels on {arch}: {} of {} modules stored as CUBINs; compile {} with NVRTC at load ({}{more})",
                    k.needed.len() - k.missing.len(),
                    k.needed.len(),
                    k.missing.len(),
                    some.join(", ")
                )
            }
            Err(e) => format!("kernels on {arch}: a load fails: {e}"),
        });
    }
    lines.push("kernels on any other architecture: compile every module with NVRTC at load".into());
    lines.push(match program.tuning.len() {
        0 => "GEMM choices: timed at load (no tuning table stored)".into(),
        n => format!("GEMM choices: read from the stored tuning table ({n} entries) where it has the card and shape, else timed at load"),
    });
    lines.extend(super::attn_tune::plan_lines(program));
    lines.join("\n")
}
