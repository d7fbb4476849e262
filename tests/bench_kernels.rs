//! `kiln bench kernels`: every step of a program lands in exactly one row with the cost
//! model's counts, and both command forms (`kiln bench kernels ...`, `kiln bench <model>`)
//! parse and run. Timings are not checked here (benchmarks measure, tests do not).

mod common;

use kiln::bench::kernels::{measure, Runs};
use kiln::bench::roofline::{CeilingOptions, Ceilings};
use kiln::{compile, CompileOptions};
use kiln_graph::cost::cost;
use kiln_models::Profile;
use kiln_runtime::{Session, WeightStore};
use std::process::Command;
use std::sync::Arc;

fn tiny_ceilings() -> Ceilings {
    Ceilings::measure(&CeilingOptions { copy_mib: 1, gemm_n: 64, reps: 1 })
}

#[test]
fn model_rows_cover_every_step_once_with_its_cost() {
    let dir = common::siglip_case("vision_map");
    let opts = CompileOptions { profile: Profile::default(), backend: "cpu".into(), trace: false };
    let program = compile(&dir, &opts).unwrap().program;
    let steps = program.entries[0].steps.clone();
    let mut s = Session::new(program, Arc::new(WeightStore::open(&dir).unwrap())).unwrap();
    for by_shape in [false, true] {
        let r = measure(&mut s, None, Runs { warmup: 0, runs: 2 }, by_shape, tiny_ceilings()).unwrap();
        assert_eq!(r.rows.iter().map(|x| x.steps).sum::<usize>(), steps.len());
        for kernel in ["cpu.gemm+epilogue", "cpu.flash_attention", "cpu.layer_norm"] {
            let mine: Vec<_> = steps.iter().filter(|s| s.kernel == kernel).collect();
            let want: u64 =
                mine.iter().map(|s| cost(&s.op, &s.inputs.iter().map(|o| o.ty.clone()).collect::<Vec<_>>(), &s.output.ty).flops).sum();
            let got: u64 = r.rows.iter().filter(|x| x.kernel == kernel).map(|x| x.flops).sum();
            assert!(!mine.is_empty(), "{kernel} not in the program");
            assert_eq!(got, want, "{kernel}, by_shape {by_shape}");
        }
        let sum: f64 = r.rows.iter().map(|x| x.seconds).sum();
        assert!((sum - r.steps_seconds).abs() < 1e-12);
        let svg = kiln::bench::svg::roofline(&r);
        assert_eq!(svg.matches("<circle").count(), r.rows.iter().filter(|x| x.flops > 0).count());
    }
}

fn kiln(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().unwrap();
    let (so, se) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "kiln {args:?} failed:\n{so}\n{se}");
    so.into_owned()
}

#[test]
fn single_kernel_mode_prints_json_and_writes_the_plot() {
    let svg = std::env::temp_dir().join(format!("kiln-bench-test-{}.svg", std::process::id()));
    let args = ["bench", "kernels", "--kernel", "cpu.gemm", "--shape", "8x16x32", "--shape", "4x8x8", "--copy-mib", "1"];
    let tail = ["--gemm-n", "64", "--runs", "1", "--warmup", "0", "--json", "--plot", svg.to_str().unwrap()];
    let out = kiln(&[&args[..], &tail[..]].concat());
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows.iter().map(|r| r["flops"].as_u64().unwrap()).sum::<u64>(), 2 * 8 * 16 * 32 + 2 * 4 * 8 * 8);
    assert!(v["ceilings"]["bandwidth_gb_per_s"].as_f64().unwrap() > 0.0);
    let plot = std::fs::read_to_string(&svg).unwrap();
    let _ = std::fs::remove_file(&svg);
    assert_eq!(plot.matches("<circle").count(), 2);
}

#[test]
fn bench_of_a_model_still_parses_and_its_breakdown_sums_to_the_total() {
    let dir = common::siglip_case("vision_nohead");
    let out = kiln(&["bench", dir.to_str().unwrap(), "--runs", "1", "--breakdown"]);
    assert!(out.contains("outside steps"), "{out}");
    let ms = |prefix: &str| -> f64 {
        let line = out.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no '{prefix}' in\n{out}"));
        line.split_whitespace().rev().find_map(|w| w.parse::<f64>().ok().filter(|_| !w.ends_with('%'))).unwrap()
    };
    let total = ms("total (one run)");
    let rows: f64 = out
        .lines()
        .skip_while(|l| !l.starts_with("kernel (op)"))
        .skip(1)
        .take_while(|l| !l.starts_with("total"))
        .map(|l| l.split_whitespace().rev().nth(1).and_then(|w| w.parse::<f64>().ok()).unwrap())
        .sum();
    // Rows are printed with two decimals: allow that rounding per row.
    assert!((rows - total).abs() < 0.01 * 20.0, "rows {rows} ms, total {total} ms\n{out}");
}
