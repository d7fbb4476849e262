//! `kiln kernels check` and ahead-of-time CUBINs for `kiln compile --backend cuda`: both
//! compile CUDA C with NVRTC (libnvrtc loaded at run time; no GPU needed).

use crate::{Error, Result};
use kiln_graph::program::Program;
use kiln_kernels::cuda::{modules, nvrtc};
use kiln_runtime::cuda::{compile_binaries, lower};

/// One row of the check's table.
#[derive(Clone, Debug)]
pub struct Row {
    pub module: String,
    pub kernel: String,
    pub hot: bool,
    pub res: nvrtc::Resources,
}

/// What `kiln kernels check` found.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub rows: Vec<Row>,
    /// Modules that failed to compile, with NVRTC's log.
    pub errors: Vec<String>,
}

impl Report {
    /// Hot kernels that spill registers (the check fails on any).
    pub fn hot_spills(&self) -> Vec<&Row> {
        self.rows.iter().filter(|r| r.hot && (r.res.spill_stores > 0 || r.res.spill_loads > 0)).collect()
    }

    /// The table printed by the CLI.
    pub fn table(&self) -> String {
        let mut s = format!(
            "{:<18} {:<34} {:>4} {:>5} {:>8} {:>6} {:>7} {:>7}\n",
            "module", "kernel", "hot", "regs", "smem", "stack", "spill-st", "spill-ld"
        );
        for r in &self.rows {
            s += &format!(
                "{:<18} {:<34} {:>4} {:>5} {:>8} {:>6} {:>7} {:>7}\n",
                if r.module.len() > 18 { &r.module[..18] } else { &r.module },
                r.kernel,
                if r.hot { "yes" } else { "" },
                r.res.registers,
                r.res.smem,
                r.res.stack,
                r.res.spill_stores,
                r.res.spill_loads
            );
        }
        s
    }
}

/// A compilation unit: its name, source and kernels (name, hot).
type Unit = (String, String, Vec<(String, bool)>);

fn nvrtc_or_error() -> Result<()> {
    if nvrtc::available() {
        Ok(())
    } else {
        Err(Error::Usage(nvrtc::INSTALL_HINT.to_string()))
    }
}

/// Compiles every hand-written CUDA module, and each fused region of `program` when given
/// (regions run in every layer: hot), for `arch`.
pub fn check(arch: &str, program: Option<&Program>) -> Result<Report> {
    nvrtc_or_error()?;
    let mut report = Report::default();
    let mut units: Vec<Unit> =
        modules().into_iter().map(|m| (m.name, m.source, m.kernels.into_iter().map(|k| (k.name, k.hot)).collect())).collect();
    if let Some(p) = program {
        for r in lower::regions(p).map_err(Error::Usage)? {
            units.push((r.name.clone(), r.source, vec![(r.name, true)]));
        }
    }
    // One thread per module: NVRTC compiles each on one core.
    let compiled: Vec<std::result::Result<nvrtc::Compiled, String>> = std::thread::scope(|sc| {
        let handles: Vec<_> = units.iter().map(|(name, source, _)| sc.spawn(move || nvrtc::compile(name, source, arch))).collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("NVRTC panicked".into()))).collect()
    });
    for ((name, source, kernels), c) in units.into_iter().zip(compiled) {
        match c {
            Err(e) => report.errors.push(e),
            Ok(c) => {
                // Kept for later loads in this process and under KILN_CUDA_CACHE.
                nvrtc::remember(&name, &source, arch, &c.cubin);
                for (k, hot) in kernels {
                    match c.kernels.iter().find(|(n, _)| *n == k) {
                        Some((_, res)) => report.rows.push(Row { module: name.clone(), kernel: k, hot, res: res.clone() }),
                        None => report.errors.push(format!("{name}: no ptxas report for kernel {k} (is it defined?)")),
                    }
                }
            }
        }
    }
    Ok(report)
}

/// The tuning table `kiln compile --backend cuda` reads unless `--tuning` names another
/// (`tuning/cuda.json`, built in).
pub const DEFAULT_TUNING: &str = include_str!("../tuning/cuda.json");

/// Reads the tuning table (`spec`: a file, `none`, or the built-in one when `None`), validates
/// it (attention entries: against this build's prefill variants) and stores its entries in
/// `program`; returns a line saying what was stored.
pub fn attach_tuning(program: &mut Program, spec: Option<&std::path::Path>) -> Result<String> {
    use kiln_graph::tuning::TuningTable;
    let (table, from) = match spec {
        Some(p) if p.as_os_str() == "none" => (TuningTable::new(), "no tuning table (--tuning none)".to_string()),
        Some(p) => {
            let shown = p.display().to_string();
            let text = std::fs::read_to_string(p).map_err(|e| Error::Usage(format!("--tuning {shown}: {e}")))?;
            (TuningTable::parse(&text, &shown).map_err(Error::Usage)?, format!("tuning table {shown}"))
        }
        None => (TuningTable::parse(DEFAULT_TUNING, "tuning/cuda.json (built in)").map_err(Error::Usage)?, "built-in tuning table".into()),
    };
    // The attention entries name kernels of this build (the table's format cannot say which).
    kiln_runtime::cuda::attn_tune::check_table(&table.entries).map_err(|e| Error::Usage(format!("{from}: {e}")))?;
    let mut cards: Vec<&str> = table.entries.iter().map(|e| e.card.as_str()).collect();
    cards.dedup();
    cards.sort_unstable();
    cards.dedup();
    let line = match cards.len() {
        0 => format!("{from}: no entries (every choice measured at load)"),
        _ => format!("{from}: {} entries for {}", table.entries.len(), cards.join(", ")),
    };
    program.tuning = table.entries;
    Ok(line)
}

/// Compiles the CUBINs a program needs for `arch` and stores them in it.
pub fn attach_binaries(program: &mut Program, arch: &str) -> Result<()> {
    nvrtc_or_error()?;
    program.binaries = compile_binaries(program, arch)?;
    Ok(())
}
