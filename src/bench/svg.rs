//! A roofline plot as hand-written SVG: log-log axes (FLOPs per byte against GFLOP/s), the
//! memory roof and the compute roof, and one labelled dot per kernel.

use super::kernels::Report;
use std::fmt::Write;

const W: f64 = 900.0;
const H: f64 = 600.0;
/// Plot area margins: left, right, top, bottom.
const ML: f64 = 80.0;
const MR: f64 = 30.0;
const MT: f64 = 75.0;
const MB: f64 = 110.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Decades `[10^lo, 10^hi]` covering `min..max` with a little room.
fn decades(min: f64, max: f64) -> (i32, i32) {
    let lo = (min / 2.0).log10().floor() as i32;
    let hi = (max * 2.0).log10().ceil() as i32;
    (lo, hi.max(lo + 1))
}

/// The report's kernels on the roofline of its ceilings. Kernels without FLOPs cannot sit on
/// a log axis; they are listed under the plot with their bandwidth instead.
pub fn roofline(r: &Report) -> String {
    let c = &r.ceilings;
    let (bw, peak) = (c.bandwidth / 1e9, c.flops / 1e9); // GB/s, GFLOP/s
    let points: Vec<(String, f64, f64, f64)> = r
        .rows
        .iter()
        .filter(|row| row.flops > 0 && row.bytes > 0 && row.seconds > 0.0)
        .map(|row| (row.label(), row.cost().intensity(), row.flop_rate() / 1e9, c.share(row.cost(), row.seconds)))
        .collect();
    let xs = points.iter().map(|p| p.1).chain([c.ridge()]);
    let (xmin, xmax) = xs.fold((f64::INFINITY, 0f64), |(a, b), x| (a.min(x), b.max(x)));
    let ys = points.iter().map(|p| p.2).chain([peak]);
    let (ymin, ymax) = ys.fold((f64::INFINITY, 0f64), |(a, b), y| (a.min(y), b.max(y)));
    let (x0, x1) = decades(xmin.min(c.ridge() / 100.0), xmax);
    let (y0, y1) = decades(ymin.min(peak / 1000.0), ymax);
    let px = |x: f64| ML + (x.log10() - x0 as f64) / (x1 - x0) as f64 * (W - ML - MR);
    let py = |y: f64| H - MB - (y.log10() - y0 as f64) / (y1 - y0) as f64 * (H - MT - MB);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let title = format!("Roofline: {} [{}], {}", r.model, r.backend, c.cpu);
    let _ = writeln!(s, r#"<text x="{}" y="24" font-size="15" text-anchor="middle">{}</text>"#, W / 2.0, esc(&title));
    let sub = [
        format!("memory roof {bw:.1} GB/s ({} MiB parallel copy), {} threads", c.copy_mib, c.threads),
        format!("compute roof {peak:.1} GFLOP/s ({n}x{n}x{n} GEMM, {})", c.gemm_kernel, n = c.gemm_n),
    ];
    for (i, line) in sub.iter().enumerate() {
        let _ = writeln!(s, r##"<text x="{}" y="{}" text-anchor="middle" fill="#444">{}</text>"##, W / 2.0, 42 + 15 * i, esc(line));
    }
    // Grid and tick labels at every decade.
    for e in x0..=x1 {
        let x = px(10f64.powi(e));
        let _ = writeln!(s, r##"<line x1="{x:.1}" y1="{MT}" x2="{x:.1}" y2="{}" stroke="#ddd"/>"##, H - MB);
        let _ = writeln!(s, r#"<text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"#, H - MB + 16.0, tick(e));
    }
    for e in y0..=y1 {
        let y = py(10f64.powi(e));
        let _ = writeln!(s, r##"<line x1="{ML}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/>"##, W - MR);
        let _ = writeln!(s, r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#, ML - 6.0, y + 4.0, tick(e));
    }
    let _ = writeln!(s, r##"<rect x="{ML}" y="{MT}" width="{}" height="{}" fill="none" stroke="#333"/>"##, W - ML - MR, H - MT - MB);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">arithmetic intensity (FLOP / byte, fewest bytes)</text>"#,
        (ML + W - MR) / 2.0,
        H - MB + 36.0
    );
    let _ = writeln!(s, r#"<text transform="translate(20,{}) rotate(-90)" text-anchor="middle">GFLOP/s</text>"#, (MT + H - MB) / 2.0);
    // The roofs: bandwidth * intensity up to the ridge, then the compute ceiling.
    let xa = 10f64.powi(x0).max(10f64.powi(y0) / bw);
    let (xr, xb) = (c.ridge(), 10f64.powi(x1));
    let _ = writeln!(
        s,
        r##"<polyline points="{:.1},{:.1} {:.1},{:.1} {:.1},{:.1}" fill="none" stroke="#c0392b" stroke-width="2.5"/>"##,
        px(xa),
        py(bw * xa),
        px(xr),
        py(peak),
        px(xb),
        py(peak)
    );
    let _ = writeln!(s, r##"<text x="{:.1}" y="{:.1}" fill="#c0392b">{peak:.0} GFLOP/s</text>"##, px(xr) + 6.0, py(peak) - 6.0);
    let _ =
        writeln!(s, r##"<text x="{:.1}" y="{:.1}" fill="#c0392b" text-anchor="end">{bw:.1} GB/s</text>"##, px(xr) - 6.0, py(peak) + 14.0);
    // Dots, then labels placed greedily: each moves down until it overlaps no earlier label.
    let mut placed: Vec<(f64, f64, f64)> = Vec::new(); // (left, right, baseline)
    for (label, x, y, share) in &points {
        let (cx, cy) = (px(*x), py(*y));
        let _ = writeln!(s, r##"<circle cx="{cx:.1}" cy="{cy:.1}" r="5" fill="#2471a3"><title>{}</title></circle>"##, esc(label));
        let text = format!("{label} ({:.0}% of roof)", 100.0 * share);
        let width = 6.6 * text.chars().count() as f64;
        // Labels of dots in the right half go to their left, so they stay inside the plot.
        let (left, anchor, tx) = if cx > (ML + W - MR) / 2.0 { (cx - 7.0 - width, "end", cx - 7.0) } else { (cx + 7.0, "start", cx + 7.0) };
        let mut ty = cy - 8.0;
        while placed.iter().any(|&(l, r, b)| (ty - b).abs() < 14.0 && left < r && l < left + width) {
            ty += 14.0;
        }
        placed.push((left, left + width, ty));
        let _ = writeln!(s, r#"<text x="{tx:.1}" y="{ty:.1}" text-anchor="{anchor}">{}</text>"#, esc(&text));
    }
    // Kernels the log axes cannot show.
    let mut y = H - MB + 58.0;
    for row in r.rows.iter().filter(|row| row.flops == 0 || row.bytes == 0) {
        let note = format!(
            "{}: no FLOPs, {:.2} GB/s ({:.0}% of the memory roof), {:.3} ms/run",
            row.label(),
            row.bandwidth() / 1e9,
            100.0 * c.share(row.cost(), row.seconds),
            row.seconds * 1e3
        );
        let _ = writeln!(s, r##"<text x="{ML}" y="{y:.1}" fill="#444">{}</text>"##, esc(&note));
        y += 16.0;
    }
    s += "</svg>\n";
    s
}

fn tick(e: i32) -> String {
    match e {
        0..=5 => format!("{}", 10u64.pow(e as u32)),
        -3..=-1 => format!("{}", 10f64.powi(e)),
        _ => format!("1e{e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::super::kernels::{KernelRow, Report};
    use super::super::roofline::Ceilings;
    use super::*;

    #[test]
    fn every_kernel_with_flops_gets_a_dot_and_the_rest_a_note() {
        let row =
            |k: &str, flops, bytes| KernelRow { kernel: k.into(), op: "x".into(), shape: None, steps: 1, seconds: 0.01, flops, bytes };
        let r = Report {
            model: "m".into(),
            entry: "forward".into(),
            backend: "cpu".into(),
            warmup: 1,
            runs: 1,
            ceilings: Ceilings {
                bandwidth: 10e9,
                flops: 100e9,
                copy_mib: 1,
                gemm_n: 16,
                gemm_kernel: "k",
                threads: 2,
                cpu: "cpu <x>".into(),
                load: None,
            },
            rows: vec![
                row("cpu.gemm", 1_000_000_000, 10_000_000),
                row("cpu.layer_norm", 1_000_000, 1_000_000),
                row("cpu.permute", 0, 1000),
            ],
            steps_seconds: 0.03,
            run_seconds: 0.03,
            outside_seconds: 0.0,
        };
        let svg = roofline(&r);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<circle").count(), 2);
        assert!(svg.contains("cpu.permute: no FLOPs"));
        assert!(svg.contains("cpu &lt;x&gt;"));
    }
}
