//! Choosing by measurement at load: for each GEMM where kiln's GEMV applies, and for every
//! small-M GEMM among cuBLASLt's candidate algorithms, the executor times the options on its
//! own buffers before the graphs are captured and keeps the fastest. A kernel of ours
//! replaces cuBLASLt only where it measures faster.
//!
//! Each option is captured into a graph of back-to-back launches and replayed, so the timing
//! is the device's (a few microseconds per GEMV at decode, less than the host's launch
//! cost). Shapes repeat in every layer: each distinct GEMM (shape, dtype, epilogue) is timed
//! once per load, and the graph runs every layer's GEMM of that shape in turn (up to
//! [`MAX_ROTATION`]), so each reads its own weights from memory as in a real run rather than
//! one matrix from L2 (Gemma 2 2B's q projection, 9.4 MB, would fit H200's 60 MB L2). The load option
//! [`GemvMode`] (`CudaBackend::gemv`, the CLI's `--cuda-gemv`) forces the choice;
//! `KILN_CUDA_VERBOSE=1` prints each decision.

use super::exec::{Choice, CudaExec};
use super::lower::Epilogue;
use crate::error::{Result, RuntimeError};
use cudarc::driver::{result as dr, sys};
use kiln_graph::tuning::{self, GemmChoice, TuningEntry, TuningTable};
use std::collections::HashMap;

/// Whether kiln's GEMV replaces cuBLASLt where it applies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GemvMode {
    /// cuBLASLt for every plain GEMM (its algorithms still timed for small M); a gated matmul
    /// has no cuBLASLt form and runs its GLU GEMV (`gemv_glu_*`) whatever the mode.
    Off,
    /// The GEMV wherever it applies, untimed (for tests and debugging).
    On,
    /// Whichever measures faster.
    #[default]
    Auto,
}

/// GEMMs with at most this many rows (M times batch) time cuBLASLt's candidate algorithms
/// (decode, and batch-1 vision: So400m at 224 px has 256 rows, where the heuristic's first
/// choice may leave SMs idle and a split-K candidate can win); above it the heuristic's first
/// is kept. A tuning table entry for the shape skips the timing.
const TUNE_MAX_ROWS: usize = 512;
/// Launches per captured graph, at least.
const LAUNCHES: usize = 10;
/// Most GEMMs of one shape a timing graph rotates through.
const MAX_ROTATION: usize = 64;
/// Timed replays of the graph (after one warm-up replay).
const REPLAYS: usize = 2;

fn err(msg: impl Into<String>) -> RuntimeError {
    RuntimeError::Unsupported { backend: "cuda".into(), msg: msg.into() }
}

fn drv<T>(what: &str, r: std::result::Result<T, dr::DriverError>) -> Result<T> {
    r.map_err(|e| err(format!("{what}: {e:?}")))
}

fn epilogue_name(e: &Epilogue) -> &'static str {
    match e {
        Epilogue::None => "",
        Epilogue::Bias(_) => "+bias",
        Epilogue::GeluTanh => "+gelu_tanh",
        Epilogue::BiasGeluTanh(_) => "+bias_gelu_tanh",
        Epilogue::Residual(_) => "+residual",
        Epilogue::BiasResidual { .. } => "+bias+residual",
    }
}

/// Whether byte ranges `[a, a + x)` and `[b, b + y)` overlap.
fn overlap(a: u64, x: u64, b: u64, y: u64) -> bool {
    x > 0 && y > 0 && a < b + y && b < a + x
}

impl CudaExec {
    /// Why GEMM `i` must not be timed (its output is a persistent state or overlaps one of
    /// its inputs), if so.
    fn untimeable(&self, i: usize) -> Option<&'static str> {
        let g = &self.gemms[i].gemm;
        let es = g.dtype.size() as u64;
        let out = (g.c, (g.batch * g.m * g.n * g.out_dtype.size()) as u64);
        for (at, st) in self.states_at.iter().zip(&self.program.states) {
            if overlap(out.0, out.1, (self.layout.arena + at) as u64, st.ty.bytes() as u64) {
                return Some("its output is a persistent state");
            }
        }
        let span = |stride: usize, one: usize| ((g.batch.max(1) - 1) * stride + one) as u64 * es;
        let (bias, res) = match g.epilogue {
            Epilogue::Bias(b) | Epilogue::BiasGeluTanh(b) => (Some(b), None),
            Epilogue::Residual(r) => (None, Some(r)),
            Epilogue::BiasResidual { bias, residual } => (Some(bias), Some(residual)),
            Epilogue::None | Epilogue::GeluTanh => (None, None),
        };
        let mut ins = vec![(g.a, span(g.a_stride, g.m * g.k)), (g.b, span(g.b_stride, g.k * g.n))];
        ins.extend(bias.map(|b| (b, g.n as u64 * es)));
        ins.extend(res.map(|r| (r, out.1)));
        if ins.iter().any(|&(a, x)| overlap(out.0, out.1, a, x)) {
            return Some("its output overlaps an input");
        }
        None
    }

    /// Seconds per GEMM of the GEMMs `seq` (one shape), each issued in turn as `choice`,
    /// or `None` where one fails to run.
    fn time_choice(&self, seq: &[usize], choice: Choice) -> Result<Option<f64>> {
        self.time_issued(|| seq.iter().try_for_each(|&i| self.issue_gemm(i, choice)), seq.len())
    }

    /// Seconds per call of the `calls` launches `issue` makes, captured into a graph and
    /// replayed, or `None` where they fail to run.
    pub(super) fn time_issued(&self, issue: impl FnOnce() -> Result<()>, calls: usize) -> Result<Option<f64>> {
        let cu = self.stream.cu_stream();
        // SAFETY: the stream is ours; capture ends below on every path.
        drv("begin capture", unsafe { dr::stream::begin_capture(cu, sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL) })?;
        let issued = issue();
        // SAFETY: capture was begun on this stream above.
        let graph = drv("end capture", unsafe { dr::stream::end_capture(cu) });
        let graph = match (issued, graph) {
            (Ok(()), Ok(g)) => g,
            (_, Ok(g)) => {
                // SAFETY: a graph captured above, not instantiated.
                let _ = unsafe { dr::graph::destroy(g) };
                return Ok(None);
            }
            _ => return Ok(None),
        };
        // SAFETY: `graph` was captured above; it is destroyed once instantiated.
        let exec = unsafe {
            let e = dr::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0));
            let _ = dr::graph::destroy(graph);
            match e {
                Ok(e) => e,
                Err(_) => return Ok(None),
            }
        };
        // SAFETY: the graph and events belong to this context and are destroyed below; the
        // GEMM writes only its output, an arena intermediate (checked by `untimeable`).
        let secs = unsafe {
            let timed = || -> std::result::Result<f32, dr::DriverError> {
                let start = dr::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT)?;
                let end = match dr::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT) {
                    Ok(e) => e,
                    Err(e) => {
                        let _ = dr::event::destroy(start);
                        return Err(e);
                    }
                };
                let r = (|| {
                    dr::graph::launch(exec, cu)?;
                    dr::event::record(start, cu)?;
                    for _ in 0..REPLAYS {
                        dr::graph::launch(exec, cu)?;
                    }
                    dr::event::record(end, cu)?;
                    dr::event::synchronize(end)?;
                    dr::event::elapsed(start, end)
                })();
                let _ = dr::event::destroy(end);
                let _ = dr::event::destroy(start);
                r
            };
            let r = timed();
            let _ = dr::graph::exec_destroy(exec);
            drv("timing launches", r)?
        };
        Ok(Some(secs as f64 * 1e-3 / (calls * REPLAYS) as f64))
    }

    /// Chooses how every planned GEMM runs (see the module's documentation).
    pub(super) fn tune(&mut self, mode: GemvMode) -> Result<()> {
        let verbose = std::env::var("KILN_CUDA_VERBOSE").is_ok_and(|v| v == "1");
        // GEMMs with a choice to make, grouped by shape and options (in first-seen order).
        let mut groups: Vec<(String, Vec<Choice>, Vec<usize>)> = Vec::new();
        let mut at: HashMap<String, usize> = HashMap::new();
        for i in 0..self.gemms.len() {
            let (g, has_gemv, algos) = (&self.gemms[i].gemm, self.gemms[i].gemv.is_some(), self.gemms[i].algos.len());
            if mode == GemvMode::On && has_gemv {
                self.gemms[i].choice = Choice::Gemv;
                continue;
            }
            let mut options: Vec<Choice> = match algos {
                0 => vec![],
                _ if g.m * g.batch <= TUNE_MAX_ROWS => (0..algos).map(Choice::Lt).collect(),
                _ => vec![Choice::Lt(0)],
            };
            if mode == GemvMode::Auto && has_gemv {
                options.push(Choice::Gemv);
            }
            if options.len() < 2 {
                continue; // the choice made when planning
            }
            let tb = if g.transpose_b { " tb" } else { "" };
            let (m, n, k, batch, epi) = (g.m, g.n, g.k, g.batch, epilogue_name(&g.epilogue));
            let mut shape = format!("{m}x{n}x{k} {:?}{tb}{epi}", g.dtype);
            if batch > 1 {
                shape += &format!(" batch {batch} strides {}/{}", g.a_stride, g.b_stride);
            }
            let key = format!("{shape} {options:?}");
            match at.get(&key) {
                Some(&j) => groups[j].2.push(i),
                None => {
                    at.insert(key, groups.len());
                    groups.push((shape, options, vec![i]));
                }
            }
        }
        let card = self.ctx.name().unwrap_or_default();
        let mut measured = Vec::new();
        let mut timed = 0;
        for (shape, options, members) in &groups {
            if let Some(choice) = self.table_choice(&card, shape, options, verbose) {
                for &i in members {
                    self.gemms[i].choice = choice;
                }
                continue;
            }
            let ok: Vec<usize> = members.iter().copied().filter(|&i| self.untimeable(i).is_none()).collect();
            if ok.is_empty() {
                if verbose {
                    let why = self.untimeable(members[0]).unwrap_or_default();
                    eprintln!("kiln cuda: gemm {shape}: not timed ({why}): {:?}", self.gemms[members[0]].choice);
                }
                continue;
            }
            if timed == 0 {
                // Defined values (zeros) in every intermediate the timings read.
                drv("bind context", self.ctx.bind_to_thread())?;
                // SAFETY: the arena lies at the start of the allocation.
                drv("memset arena", unsafe {
                    dr::memset_d8_async(self.base + self.layout.arena as u64, 0, self.layout.arena_bytes, self.stream.cu_stream())
                })?;
            }
            timed += 1;
            // Every layer's GEMM of this shape in turn (each its own weights), as a model
            // runs them: the weights stream from memory rather than from L2.
            let seq: Vec<usize> = ok.iter().copied().cycle().take(ok.len().clamp(LAUNCHES, MAX_ROTATION.max(LAUNCHES))).collect();
            let mut times = Vec::with_capacity(options.len());
            for &c in options {
                times.push((c, self.time_choice(&seq, c)?));
            }
            let best = times.iter().filter_map(|&(c, t)| Some((c, t?))).min_by(|a, b| a.1.total_cmp(&b.1)).map(|(c, _)| c);
            let choice = best.unwrap_or(self.gemms[members[0]].choice);
            for &i in members {
                self.gemms[i].choice = choice;
            }
            if let Some(&(_, Some(t))) = times.iter().find(|(c, _)| Some(*c) == best) {
                measured.push(TuningEntry {
                    card: card.clone(),
                    kernel: "gemm".into(),
                    shape: shape.clone(),
                    choice: choice_name(choice),
                    us: Some((t * 1e7).round() / 10.0),
                });
            }
            if verbose {
                eprintln!("kiln cuda: gemm {shape} (x{}): {}", members.len(), report(&times, choice));
            }
        }
        if verbose {
            let n = self.gemms.len();
            let gemv = self.gemms.iter().filter(|g| g.choice == Choice::Gemv).count();
            eprintln!("kiln cuda: {n} GEMMs ({timed} shapes timed): {gemv} run as kiln's GEMV, {} on cuBLASLt ({mode:?})", n - gemv);
        }
        self.choose_norms(&card, &mut measured, verbose)?;
        self.choose_attention(&card, &mut measured, verbose)?;
        write_measured(measured)?;
        drv("sync", self.stream.synchronize())
    }

    /// The tuning table's choice for GEMMs of `shape` on `card` (the program's
    /// [`Program::tuning`](kiln_graph::program::Program::tuning)), where it names one of
    /// `options`.
    fn table_choice(&self, card: &str, shape: &str, options: &[Choice], verbose: bool) -> Option<Choice> {
        let e = tuning::lookup(&self.program.tuning, card, "gemm", shape)?;
        let choice = table_option(&e.choice, options);
        if verbose {
            match choice {
                Some(c) => eprintln!("kiln cuda: gemm {shape}: {} from the tuning table (not timed)", choice_name(c)),
                None => eprintln!("kiln cuda: gemm {shape}: the tuning table's {} is not an option here: timed", e.choice),
            }
        }
        choice
    }
}

/// The option a tuning table's `choice` names, if it is among `options`.
fn table_option(choice: &str, options: &[Choice]) -> Option<Choice> {
    let c = match GemmChoice::parse(choice)? {
        GemmChoice::Gemv => Choice::Gemv,
        GemmChoice::CublasLt(i) => Choice::Lt(i),
    };
    options.contains(&c).then_some(c)
}

fn choice_name(c: Choice) -> String {
    match c {
        Choice::Gemv => GemmChoice::Gemv.name(),
        Choice::Lt(i) => GemmChoice::CublasLt(i).name(),
    }
}

/// Merges the choices measured at this load into the table `KILN_CUDA_TUNING_OUT` names
/// (created if missing): how the device script makes a tuning table.
fn write_measured(measured: Vec<TuningEntry>) -> Result<()> {
    let Some(path) = std::env::var_os("KILN_CUDA_TUNING_OUT") else { return Ok(()) };
    let path = std::path::PathBuf::from(path);
    let shown = path.display().to_string();
    let mut table = match std::fs::read_to_string(&path) {
        Ok(text) => TuningTable::parse(&text, &shown).map_err(err)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => TuningTable::new(),
        Err(e) => return Err(err(format!("KILN_CUDA_TUNING_OUT {shown}: {e}"))),
    };
    table.merge(measured);
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, table.to_json())
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| err(format!("KILN_CUDA_TUNING_OUT {shown}: {e}")))
}

/// One line on a timed shape: cuBLASLt's best algorithm against its heuristic's first, the
/// GEMV, and the winner.
fn report(times: &[(Choice, Option<f64>)], choice: Choice) -> String {
    let us = |t: Option<f64>| t.map_or("failed".to_string(), |t| format!("{:.1} us", t * 1e6));
    let lt: Vec<(usize, Option<f64>)> =
        times.iter().filter_map(|&(c, t)| if let Choice::Lt(a) = c { Some((a, t)) } else { None }).collect();
    let mut line = String::new();
    if let Some((a, t)) = lt.iter().filter_map(|&(a, t)| Some((a, t?))).min_by(|a, b| a.1.total_cmp(&b.1)) {
        line += &format!("cublasLt {} (algo {a} of {}", us(Some(t)), lt.len());
        line += &if lt.len() > 1 { format!(", the heuristic's first {})", us(lt[0].1)) } else { ")".to_string() };
    }
    if let Some(&(_, t)) = times.iter().find(|(c, _)| *c == Choice::Gemv) {
        line += &format!(", gemv {}", us(t));
    }
    let winner = match choice {
        Choice::Gemv => "gemv".to_string(),
        Choice::Lt(a) => format!("cublasLt algo {a}"),
    };
    format!("{line} -> {winner}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_overlap_only_when_they_share_a_byte() {
        assert!(overlap(0, 10, 9, 1));
        assert!(!overlap(0, 10, 10, 5));
        assert!(!overlap(0, 0, 0, 5));
        assert!(overlap(256, 512, 0, 1024));
    }

    #[test]
    fn a_table_choice_applies_only_where_it_is_an_option() {
        let both = [Choice::Lt(0), Choice::Lt(1), Choice::Gemv];
        assert_eq!(table_option("gemv", &both), Some(Choice::Gemv));
        assert_eq!(table_option("cublaslt:1", &both), Some(Choice::Lt(1)));
        // cuBLASLt offered fewer algorithms here, or the GEMV does not apply: timed instead.
        assert_eq!(table_option("cublaslt:5", &both), None);
        assert_eq!(table_option("gemv", &both[..2]), None);
        assert_eq!(table_option("nonsense", &both), None);
        for c in both {
            assert_eq!(table_option(&choice_name(c), &both), Some(c));
        }
    }
}
