//! Criterion benches of whole-model work on the shipped SigLIP fixture (cpu backend): the
//! compiler (build + passes + schedule + plan + lower) and one forward run. Full-size model
//! timings against PyTorch come from `scripts/bench_siglip_cpu.sh` (same run, same weights).

use criterion::{criterion_group, criterion_main, Criterion};
use kiln::{compile, io, CompileOptions};
use kiln_models::Profile;
use kiln_runtime::{Session, Tensor, WeightStore};
use std::path::Path;
use std::sync::Arc;

fn benches(c: &mut Criterion) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/siglip/vision_map");
    let opts = CompileOptions { profile: Profile { batch: 2, ..Profile::default() }, backend: "cpu".into(), trace: false };
    c.bench_function("compile vision_map", |b| b.iter(|| compile(&dir, &opts).expect("compile")));
    let program = compile(&dir, &opts).expect("compile").program;
    let mut s = Session::new(program, Arc::new(WeightStore::open(&dir).expect("weights"))).expect("session");
    let inputs = io::read(&dir.join("inputs.safetensors")).expect("inputs");
    let refs: Vec<(&str, &Tensor)> = inputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
    c.bench_function("run vision_map b2 cpu", |b| b.iter(|| s.run("forward", &refs).expect("run")));
}

criterion_group! {
    name = group;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(3));
    targets = benches
}
criterion_main!(group);
