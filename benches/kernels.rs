//! Criterion benches of each hot kernel as the runtime runs it (the cpu backend's step, with
//! weights packed at load as a model's are), one one-op program per kernel at the shapes of
//! `kiln bench kernels` (SigLIP So400m/14 at 224 px): the same programs that command times,
//! here with criterion's statistics and HTML reports (`target/criterion/report/index.html`).
//!
//! Run with `cargo bench --bench kernels`. Throughput is in FLOPs from the cost model
//! (criterion's "elements"), so "Gelem/s" reads as GFLOP/s; permute has no FLOPs and is
//! reported in bytes. A timed run includes copying the inputs in and the output out, which
//! `kiln bench kernels` excludes (it times the step alone).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kiln::bench::{single, synthetic_inputs};
use kiln_graph::cost::cost;
use kiln_runtime::Tensor;
use std::time::Duration;

fn benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("kernel");
    g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    for kind in &single::KINDS {
        let mut s = single::session(kind.name, kind.default_shape, "cpu").unwrap_or_else(|e| panic!("{}: {e}", kind.name));
        let e = s.program().entries[0].clone();
        let work: kiln_graph::cost::Cost =
            e.steps.iter().map(|st| cost(&st.op, &st.inputs.iter().map(|o| o.ty.clone()).collect::<Vec<_>>(), &st.output.ty)).sum();
        g.throughput(if work.flops > 0 { Throughput::Elements(work.flops) } else { Throughput::Bytes(work.bytes) });
        let inputs = synthetic_inputs(&e);
        let refs: Vec<(&str, &Tensor)> = inputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
        g.bench_function(BenchmarkId::new(kind.name, kind.default_shape), |b| b.iter(|| s.run("forward", &refs).expect("run")));
    }
    g.finish();
}

criterion_group!(group, benches);
criterion_main!(group);
