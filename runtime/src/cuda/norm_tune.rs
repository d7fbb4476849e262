//! Layer and RMS norm variants chosen per card and shape: the block-per-row kernels (the
//! default) or the warp-per-row ones (`norm.cu`'s `*_norm_warp_*`, the row held in registers
//! as 16-byte vectors), where a shape fits them.
//!
//! The choice comes from the artifact's tuning table for this card ([`kiln_graph::tuning`],
//! kernels `layer_norm` / `rms_norm`, shape `ROWSxD DTYPE`, choice `block` or `warp`). With
//! `KILN_CUDA_TUNE=norms` a load measures the shapes the table lacks: each variant first runs
//! on random rows beside the block kernel, and a variant whose output differs beyond the
//! dtype's rounding is rejected (reported, never timed, never chosen); the rest are timed as
//! the GEMMs are, and the faster kept. The choices measured go to `KILN_CUDA_TUNING_OUT`
//! with the GEMMs'.

use super::exec::{CudaExec, Item};
use crate::error::{Result, RuntimeError};
use cudarc::driver::result as dr;
use kiln_graph::program::Slot;
use kiln_graph::tuning::{self, TuningEntry};
use kiln_graph::DType;

/// Launches per timing graph.
const LAUNCHES: usize = 20;
/// Vectors per lane the warp kernels hold (`MAXV` in norm.cu).
const MAXV: usize = 12;

fn err(msg: impl Into<String>) -> RuntimeError {
    RuntimeError::Unsupported { backend: "cuda".into(), msg: msg.into() }
}

fn drv<T>(what: &str, r: std::result::Result<T, dr::DriverError>) -> Result<T> {
    r.map_err(|e| err(format!("{what}: {e:?}")))
}

/// A norm launch's fields, read from its (relocated) parameter block (`NormParams`).
#[derive(Clone, Copy, Debug)]
struct NormLaunch {
    x: u64,
    w: u64,
    b: u64,
    out: u64,
    rows: usize,
    d: usize,
}

impl NormLaunch {
    fn read(params: &[u8]) -> Option<NormLaunch> {
        let u = |i: usize| params.get(i * 8..i * 8 + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
        let i = |at: usize| params.get(at..at + 4).and_then(|b| b.try_into().ok()).map(i32::from_le_bytes);
        Some(NormLaunch { x: u(0)?, w: u(1)?, b: u(2)?, out: u(3)?, rows: i(32)?.max(0) as usize, d: i(36)?.max(0) as usize })
    }

    /// Whether the warp kernel takes these rows (`dtype` of `esize` bytes; `layer` reads a bias).
    fn fits_warp(&self, esize: usize, layer: bool) -> bool {
        let ve = 16 / esize;
        let aligned = [self.x, self.w, self.out].iter().chain(layer.then_some(&self.b)).all(|p| p.is_multiple_of(16));
        self.d > 0 && self.d.is_multiple_of(ve) && self.d / ve <= 32 * MAXV && aligned
    }
}

/// `layer_norm_bf16` -> (`layer_norm`, `bf16`).
fn family(kernel: &str) -> Option<(&'static str, &str)> {
    for fam in ["layer_norm", "rms_norm"] {
        if let Some(t) = kernel.strip_prefix(fam).and_then(|r| r.strip_prefix('_')) {
            if matches!(t, "f32" | "bf16" | "f16") {
                return Some((fam, t));
            }
        }
    }
    None
}

fn dtype_of(t: &str) -> DType {
    match t {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        _ => DType::F32,
    }
}

/// The largest difference allowed between the variants: a few roundings of the dtype.
fn tolerance(t: &str) -> f32 {
    match t {
        "bf16" => 1.6e-2,
        "f16" => 2e-3,
        _ => 1e-5,
    }
}

/// One norm shape: its family, type, table key and the (entry, step, item) launches.
struct Group {
    fam: &'static str,
    t: String,
    shape: String,
    members: Vec<(usize, usize, usize)>,
}

impl CudaExec {
    /// The warp variant of the launch at `at`.
    fn warp_item(&self, at: (usize, usize, usize), fam: &str, t: &str, n: NormLaunch) -> Result<Item> {
        let Item::Kernel { launch, .. } = &self.items[at.0][at.1][at.2] else { return Err(err("not a kernel launch")) };
        let mut l = launch.clone();
        l.kernel = format!("{fam}_warp_{t}");
        l.grid = (((n.rows * 32).div_ceil(l.block as usize)).max(1) as u32, 1, 1);
        let f = *self.funcs.get(&l.kernel).ok_or_else(|| err(format!("kernel {} is in no loaded module", l.kernel)))?;
        Ok(Item::Kernel { f, launch: l })
    }

    /// Norm shapes of the program whose rows the warp kernels take, in first-seen order.
    fn norm_groups(&self) -> Vec<Group> {
        let mut groups: Vec<Group> = Vec::new();
        for (e, steps) in self.items.iter().enumerate() {
            for (i, items) in steps.iter().enumerate() {
                for (j, item) in items.iter().enumerate() {
                    let Item::Kernel { launch, .. } = item else { continue };
                    let Some((fam, t)) = family(&launch.kernel) else { continue };
                    let Some(n) = NormLaunch::read(&launch.params) else { continue };
                    if !n.fits_warp(dtype_of(t).size(), fam == "layer_norm") {
                        continue;
                    }
                    let shape = format!("{}x{} {:?}", n.rows, n.d, dtype_of(t));
                    match groups.iter_mut().find(|g| g.fam == fam && g.shape == shape) {
                        Some(g) => g.members.push((e, i, j)),
                        None => groups.push(Group { fam, t: t.to_string(), shape, members: vec![(e, i, j)] }),
                    }
                }
            }
        }
        groups
    }

    /// Chooses each norm's kernel (see the module's documentation); measured choices are
    /// added to `measured`.
    pub(super) fn choose_norms(&mut self, card: &str, measured: &mut Vec<TuningEntry>, verbose: bool) -> Result<()> {
        let tune = std::env::var("KILN_CUDA_TUNE").is_ok_and(|v| v.split(',').any(|x| x == "norms"));
        for g in self.norm_groups() {
            let warp = match tuning::lookup(&self.program.tuning, card, g.fam, &g.shape) {
                Some(e) => {
                    if verbose {
                        eprintln!("kiln cuda: {} {}: {} from the tuning table (not timed)", g.fam, g.shape, e.choice);
                    }
                    e.choice == "warp"
                }
                None if tune => match self.measure_norm(&g, verbose)? {
                    Some((warp, us)) => {
                        let choice = if warp { "warp" } else { "block" };
                        let (card, kernel, shape) = (card.to_string(), g.fam.to_string(), g.shape.clone());
                        measured.push(TuningEntry { card, kernel, shape, choice: choice.into(), us: Some((us * 10.0).round() / 10.0) });
                        warp
                    }
                    None => false,
                },
                None => false,
            };
            if warp {
                for &at in &g.members {
                    let Item::Kernel { launch, .. } = &self.items[at.0][at.1][at.2] else { continue };
                    let n = NormLaunch::read(&launch.params).ok_or_else(|| err("norm parameters"))?;
                    let item = self.warp_item(at, g.fam, &g.t, n)?;
                    self.items[at.0][at.1][at.2] = item;
                }
            }
        }
        Ok(())
    }

    /// Checks the warp variant against the block kernel on random rows and times both:
    /// `Some((warp faster, its microseconds per call))`, or `None` where the variant was
    /// rejected or the shape cannot be measured in place.
    fn measure_norm(&self, g: &Group, verbose: bool) -> Result<Option<(bool, f64)>> {
        // A member whose input and output are arena or state memory (written freely before
        // the states are zeroed), never a weight.
        let writable = |s: &Slot| matches!(s, Slot::Arena { .. } | Slot::State(_));
        let Some(&at) = g.members.iter().find(|&&(e, i, _)| {
            let step = &self.program.entries[e].steps[i];
            step.inputs.first().is_some_and(|o| writable(&o.slot)) && writable(&step.output.slot)
        }) else {
            return Ok(None);
        };
        let Item::Kernel { launch, .. } = &self.items[at.0][at.1][at.2] else { return Ok(None) };
        let n = NormLaunch::read(&launch.params).ok_or_else(|| err("norm parameters"))?;
        let block = self.items[at.0][at.1][at.2].clone();
        let warp = self.warp_item(at, g.fam, &g.t, n)?;
        let dt = dtype_of(&g.t);
        let count = n.rows * n.d;
        // Random rows (a fixed LCG: normal-ish values around 0.3 with spread 1).
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let vals: Vec<f32> = (0..count)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.4 + 0.3
            })
            .collect();
        let bytes = crate::tensor::convert(DType::F32, dt, &vals.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>());
        let run = |item: &Item| -> Result<Vec<f32>> {
            // SAFETY: x lies inside the allocation with `count` elements (the step's operand);
            // written before each run, in case the output is the input's slot.
            drv("norm check upload", unsafe { dr::memcpy_htod_sync(n.x, &bytes[..]) })?;
            self.issue(item)?;
            drv("sync", self.stream.synchronize())?;
            let mut out = vec![0u8; count * dt.size()];
            // SAFETY: the output operand holds `count` elements.
            drv("norm check download", unsafe { dr::memcpy_dtoh_sync(&mut out[..], n.out) })?;
            Ok(crate::tensor::convert(dt, DType::F32, &out).chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
        };
        let (want, got) = (run(&block)?, run(&warp)?);
        let tol = tolerance(&g.t);
        let worst = want
            .iter()
            .zip(&got)
            .map(|(a, b)| if a.is_finite() && b.is_finite() { (a - b).abs() / (1.0 + a.abs()) } else { f32::INFINITY })
            .fold(0.0f32, f32::max);
        if worst > tol {
            eprintln!(
                "kiln cuda: {} {}: the warp variant REJECTED (differs from the block kernel by {worst:.3e} > {tol:.1e})",
                g.fam, g.shape
            );
            return Ok(None);
        }
        let time = |item: &Item| self.time_issued(|| (0..LAUNCHES).try_for_each(|_| self.issue(item)), LAUNCHES);
        let (tb, tw) = (time(&block)?, time(&warp)?);
        let (Some(tb), Some(tw)) = (tb, tw) else { return Ok(None) };
        let warp_wins = tw < tb;
        if verbose {
            let gbs = |t: f64| 2.0 * (count * dt.size()) as f64 / t / 1e9;
            eprintln!(
                "kiln cuda: {} {}: block {:.1} us ({:.0} GB/s), warp {:.1} us ({:.0} GB/s; max diff {worst:.2e}) -> {}",
                g.fam,
                g.shape,
                tb * 1e6,
                gbs(tb),
                tw * 1e6,
                gbs(tw),
                if warp_wins { "warp" } else { "block" }
            );
        }
        Ok(Some((warp_wins, if warp_wins { tw } else { tb } * 1e6)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(x: u64, w: u64, b: u64, out: u64, rows: i32, d: i32) -> Vec<u8> {
        let mut p = Vec::new();
        for v in [x, w, b, out] {
            p.extend(v.to_le_bytes());
        }
        for v in [rows, d] {
            p.extend(v.to_le_bytes());
        }
        p.extend(1e-6f32.to_le_bytes());
        p.extend(1i32.to_le_bytes());
        p
    }

    #[test]
    fn norm_parameters_read_back_and_the_warp_kernels_fit_only_aligned_rows() {
        assert_eq!(std::mem::size_of::<kiln_kernels::cuda::NormParams>(), params(0, 0, 0, 0, 0, 0).len());
        let n = NormLaunch::read(&params(256, 512, 0, 1024, 8192, 1152)).unwrap();
        assert_eq!((n.x, n.w, n.out, n.rows, n.d), (256, 512, 1024, 8192, 1152));
        assert!(n.fits_warp(2, false) && n.fits_warp(4, false)); // So400m's width: 144 bf16 or 288 f32 vectors
        let n = NormLaunch::read(&params(256, 512, 8, 1024, 8192, 1152)).unwrap();
        assert!(n.fits_warp(2, false) && !n.fits_warp(2, true)); // only a layer norm reads the (unaligned) bias
        let n = NormLaunch::read(&params(256, 512, 768, 1024, 1, 2304)).unwrap();
        assert!(n.fits_warp(2, true) && !n.fits_warp(4, true)); // Gemma 2 2B: 288 bf16 vectors; 576 f32 > 32 * 12
        let n4 = NormLaunch::read(&params(256, 512, 768, 1024, 1, 1536 + 4)).unwrap();
        assert!(!n4.fits_warp(4, false), "more than 32 * MAXV vectors");
        let odd = NormLaunch::read(&params(256, 512, 768, 1024, 4, 1000)).unwrap();
        assert!(odd.fits_warp(2, false) && !NormLaunch::read(&params(256, 512, 768, 1024, 4, 1001)).unwrap().fits_warp(2, false));
        let unaligned = NormLaunch::read(&params(264, 512, 768, 1024, 4, 1024)).unwrap();
        assert!(!unaligned.fits_warp(2, false));
        assert_eq!(family("rms_norm_bf16"), Some(("rms_norm", "bf16")));
        assert_eq!(family("rms_norm_warp_bf16"), None);
        assert_eq!(family("softmax_f32"), None);
    }
}
