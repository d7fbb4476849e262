//! Per-kernel timing of a loaded program: warm-up, repeated runs with every step timed, each
//! step's median, then steps grouped by kernel (and optionally by shape) with their FLOPs
//! and bytes from the cost model and their share of the measured ceilings.

use super::roofline::Ceilings;
use super::{median, shape_label, synthetic_inputs};
use crate::Result;
use kiln_graph::cost::{cost, Cost};
use kiln_runtime::{Session, Tensor};
use std::time::Instant;

/// How many runs to make.
#[derive(Clone, Copy, Debug)]
pub struct Runs {
    /// Untimed runs first.
    pub warmup: usize,
    /// Timed runs (each step's median over them is kept).
    pub runs: usize,
}

/// One row of the table: the steps of one kernel (of one shape, with `--by-shape`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct KernelRow {
    pub kernel: String,
    /// The op the kernel computes.
    pub op: String,
    /// The shape in `--shape` syntax when rows are split by shape (or all steps share one).
    pub shape: Option<String>,
    /// Steps of the program that run this kernel (at this shape).
    pub steps: usize,
    /// Sum over those steps of each step's median time, in seconds: this kernel's time per run.
    pub seconds: f64,
    pub flops: u64,
    pub bytes: u64,
}

impl KernelRow {
    /// The work of one run of these steps.
    pub fn cost(&self) -> Cost {
        Cost { flops: self.flops, bytes: self.bytes }
    }

    /// The row's name on plots and tables.
    pub fn label(&self) -> String {
        match &self.shape {
            Some(s) => format!("{} {s}", self.kernel),
            None => self.kernel.clone(),
        }
    }

    /// Bytes per second achieved.
    pub fn bandwidth(&self) -> f64 {
        self.bytes as f64 / self.seconds.max(1e-12)
    }

    /// FLOPs per second achieved.
    pub fn flop_rate(&self) -> f64 {
        self.flops as f64 / self.seconds.max(1e-12)
    }
}

/// Everything one `kiln bench kernels` measurement found.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    pub model: String,
    /// The entry measured (`forward`, `decode`, ...).
    pub entry: String,
    pub backend: String,
    pub warmup: usize,
    pub runs: usize,
    pub ceilings: Ceilings,
    /// Slowest first.
    pub rows: Vec<KernelRow>,
    /// Sum of every step's median, in seconds.
    pub steps_seconds: f64,
    /// Median over the timed runs of each run's whole time (inputs copied in, outputs out).
    pub run_seconds: f64,
    /// Median over the timed runs of each run's time outside its steps (that run's whole time
    /// less the sum of its steps): the copies in and out, and the timers themselves.
    pub outside_seconds: f64,
}

/// Times every step of an entry of `session` (`entry`, or its first: `forward`) and groups
/// the steps by kernel (and by shape when `by_shape`).
pub fn measure(session: &mut Session, entry: Option<&str>, runs: Runs, by_shape: bool, ceilings: Ceilings) -> Result<Report> {
    let p = session.program();
    let entry = match entry {
        Some(name) => p.entry(name).ok_or_else(|| {
            let have: Vec<&str> = p.entries.iter().map(|e| e.name.as_str()).collect();
            crate::Error::Usage(format!("--entry {name}: the program has entries {}", have.join(", ")))
        })?,
        None => p.entries.first().ok_or_else(|| crate::Error::Usage("the program has no entry".into()))?,
    }
    .clone();
    let inputs = synthetic_inputs(&entry);
    let refs: Vec<(&str, &Tensor)> = inputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
    for _ in 0..runs.warmup {
        session.run(&entry.name, &refs)?;
    }
    let n = runs.runs.max(1);
    let mut per_step: Vec<Vec<f64>> = vec![Vec::with_capacity(n); entry.steps.len()];
    let (mut totals, mut outside) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        let t = Instant::now();
        let steps = session.profile(&entry.name, &refs)?;
        let total = t.elapsed().as_secs_f64();
        totals.push(total);
        outside.push(total - steps.iter().map(|s| s.2).sum::<f64>());
        for (v, (_, _, s)) in per_step.iter_mut().zip(steps) {
            v.push(s);
        }
    }
    let mut rows: Vec<KernelRow> = Vec::new();
    let mut labels: Vec<(usize, String)> = Vec::new(); // (row, label) for the "one shape" check
    for (s, times) in entry.steps.iter().zip(per_step.iter_mut()) {
        let types: Vec<_> = s.inputs.iter().map(|o| o.ty.clone()).collect();
        let c = cost(&s.op, &types, &s.output.ty);
        let label = shape_label(&s.op, &types, &s.output.ty);
        let t = median(times);
        let key = by_shape.then(|| label.clone());
        let i = match rows.iter().position(|r| r.kernel == s.kernel && r.shape == key) {
            Some(i) => i,
            None => {
                let op = s.op.name().to_string();
                rows.push(KernelRow { kernel: s.kernel.clone(), op, shape: key, steps: 0, seconds: 0.0, flops: 0, bytes: 0 });
                rows.len() - 1
            }
        };
        let r = &mut rows[i];
        r.steps += 1;
        r.seconds += t;
        r.flops += c.flops;
        r.bytes += c.bytes;
        if r.op != s.op.name() && !r.op.split('/').any(|o| o == s.op.name()) {
            r.op = format!("{}/{}", r.op, s.op.name());
        }
        labels.push((i, label));
    }
    // A row whose steps all share one shape names it, even when rows are not split by shape.
    for (i, r) in rows.iter_mut().enumerate() {
        let mut mine = labels.iter().filter(|(j, _)| *j == i).map(|(_, l)| l);
        if let (None, Some(first)) = (&r.shape, mine.next()) {
            if mine.all(|l| l == first) {
                r.shape = Some(first.clone());
            }
        }
    }
    rows.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    let steps_seconds = rows.iter().map(|r| r.seconds).sum();
    let p = session.program();
    Ok(Report {
        model: p.model.clone(),
        entry: entry.name.clone(),
        backend: p.backend.clone(),
        warmup: runs.warmup,
        runs: n,
        ceilings,
        rows,
        steps_seconds,
        run_seconds: median(&mut totals),
        outside_seconds: median(&mut outside),
    })
}

/// Appends another report's rows (single-kernel mode measures one program per shape).
pub fn merge(into: &mut Report, other: Report) {
    into.rows.extend(other.rows);
    into.steps_seconds += other.steps_seconds;
    into.run_seconds += other.run_seconds;
    into.outside_seconds += other.outside_seconds;
    if into.model != other.model {
        into.model = "single kernels".into();
    }
}

fn si(x: f64) -> String {
    match x {
        x if x >= 1e12 => format!("{:.2} T", x / 1e12),
        x if x >= 1e9 => format!("{:.2} G", x / 1e9),
        x if x >= 1e6 => format!("{:.2} M", x / 1e6),
        x if x >= 1e3 => format!("{:.2} k", x / 1e3),
        x => format!("{x:.0} "),
    }
}

/// Rows merged per kernel (shapes summed), slowest first.
pub fn by_kernel(rows: &[KernelRow]) -> Vec<KernelRow> {
    let mut out: Vec<KernelRow> = Vec::new();
    for r in rows {
        match out.iter_mut().find(|o| o.kernel == r.kernel) {
            Some(o) => {
                o.steps += r.steps;
                o.seconds += r.seconds;
                o.flops += r.flops;
                o.bytes += r.bytes;
                if o.shape != r.shape {
                    o.shape = None;
                }
            }
            None => out.push(r.clone()),
        }
    }
    out.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    out
}

/// The report as an aligned text table with the ceilings above it and a sum below it; when
/// rows are split by shape, a table per kernel comes first.
pub fn table(r: &Report) -> String {
    let merged = by_kernel(&r.rows);
    if merged.len() == r.rows.len() {
        return table_of(r, &r.rows);
    }
    let mut s = table_of(r, &merged);
    let body = table_of(r, &r.rows);
    s += "\nby kernel and shape:\n";
    s += body.split_once("\n\n").map_or(body.as_str(), |(_, rest)| rest);
    s
}

fn table_of(r: &Report, rows: &[KernelRow]) -> String {
    let c = &r.ceilings;
    let mut s = String::new();
    s += &format!(
        "{} [backend {}], entry {}, warm-up {}, {} timed runs, {} threads\n",
        r.model, r.backend, r.entry, r.warmup, r.runs, c.threads
    );
    s += &format!("machine: {}", c.cpu);
    if let Some(l) = c.load {
        s += &format!(", load average {l:.1} (1 min, highest seen while measuring)");
    }
    s += "\n";
    s += "ceilings (best of before and after the kernels):\n";
    s += &format!("memory ceiling:  {:8.2} GB/s      ({} MiB parallel copy, read + write)\n", c.bandwidth / 1e9, c.copy_mib);
    s += &format!("compute ceiling: {:8.2} GFLOP/s   ({n}x{n}x{n} GEMM, {})\n", c.flops / 1e9, c.gemm_kernel, n = c.gemm_n);
    s += &format!("ridge: {:.1} FLOP/byte\n\n", c.ridge());
    s += &format!(
        "{:<36} {:>5} {:>10} {:>6} {:>9} {:>9} {:>8} {:>9} {:>7} {:>8} {:>7}\n",
        "kernel [shape]", "steps", "ms/run", "time", "FLOP", "bytes", "GB/s", "GFLOP/s", "FLOP/B", "bound", "of roof"
    );
    for row in rows {
        let k = row.cost();
        s += &format!(
            "{:<36} {:>5} {:>10.3} {:>5.1}% {:>9} {:>9} {:>8.2} {:>9.2} {:>7.2} {:>8} {:>6.1}%\n",
            row.label(),
            row.steps,
            row.seconds * 1e3,
            100.0 * row.seconds / r.steps_seconds.max(1e-12),
            si(row.flops as f64),
            format!("{}B", si(row.bytes as f64)),
            row.bandwidth() / 1e9,
            row.flop_rate() / 1e9,
            k.intensity(),
            c.bound(k),
            100.0 * c.share(k, row.seconds),
        );
    }
    let steps: usize = rows.iter().map(|x| x.steps).sum();
    s += &format!("{:<36} {:>5} {:>10.3}\n", "all steps (sum of step medians)", steps, r.steps_seconds * 1e3);
    s += &format!("{:<36} {:>5} {:>10.3}\n", "outside steps (median)", "", r.outside_seconds * 1e3);
    s += &format!(
        "{:<36} {:>5} {:>10.3}   (medians need not add up: each is taken over the runs alone)\n",
        "whole run (median)",
        "",
        r.run_seconds * 1e3
    );
    if rows.iter().any(|row| c.share(row.cost(), row.seconds) > 1.0) {
        s += "(over 100% of the roof: that kernel's data fits in cache, which is faster than the memory the copy measures,\n";
        s += " or other load on the machine slowed the ceilings' measurement more than that kernel's)\n";
    }
    s
}

/// The report as one JSON object (rates in GB/s and GFLOP/s, times in ms).
pub fn json(r: &Report) -> serde_json::Value {
    let c = &r.ceilings;
    let rows: Vec<serde_json::Value> = r
        .rows
        .iter()
        .map(|row| {
            let k = row.cost();
            serde_json::json!({
                "kernel": row.kernel, "op": row.op, "shape": row.shape, "steps": row.steps,
                "ms": row.seconds * 1e3, "flops": row.flops, "bytes": row.bytes,
                "gb_per_s": row.bandwidth() / 1e9, "gflop_per_s": row.flop_rate() / 1e9,
                "intensity": k.intensity(), "bound": c.bound(k), "share_of_ceiling": c.share(k, row.seconds),
            })
        })
        .collect();
    serde_json::json!({
        "model": r.model, "entry": r.entry, "backend": r.backend, "warmup": r.warmup, "runs": r.runs,
        "machine": {"cpu": c.cpu, "threads": c.threads, "load_average": c.load},
        "ceilings": {
            "bandwidth_gb_per_s": c.bandwidth / 1e9, "copy_mib": c.copy_mib,
            "compute_gflop_per_s": c.flops / 1e9, "gemm_n": c.gemm_n, "gemm_kernel": c.gemm_kernel,
        },
        "rows": rows,
        "steps_ms": r.steps_seconds * 1e3,
        "outside_steps_ms": r.outside_seconds * 1e3,
        "run_ms": r.run_seconds * 1e3,
    })
}
