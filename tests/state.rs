//! Persistent program state (the KV cache's mechanism): zeroed at load, fed to entry inputs
//! of its name, updated from entry outputs of its name, shared by entries, reset on request.

use kiln_graph::program::{Program, StateSpec};
use kiln_graph::{DType, Graph, Op, TensorType};
use kiln_runtime::{Session, Tensor, WeightStore};
use std::sync::Arc;

#[test]
fn state_carries_across_runs_and_entries() {
    let ty = TensorType::new(DType::F32, [3]);
    let backend = kiln_runtime::by_name("cpu").unwrap();
    let mut program = Program {
        model: "counter".into(),
        backend: "cpu".into(),
        source: String::new(),
        weights: vec![],
        constants: vec![],
        entries: vec![],
        states: vec![StateSpec { name: "acc".into(), ty: ty.clone() }],
        binaries: vec![],
    };
    // `add`: acc += x, returns acc; `peek`: returns acc * 2 without writing it.
    let mut add = Graph::new();
    let acc = add.input("acc", DType::F32, &[3]).unwrap();
    let x = add.input("x", DType::F32, &[3]).unwrap();
    let y = add.add(acc, x).unwrap();
    add.output("acc", y);
    add.output("sum", y);
    let mut peek = Graph::new();
    let acc = peek.input("acc", DType::F32, &[3]).unwrap();
    let y = peek.mul_scalar(acc, 2.0).unwrap();
    peek.output("twice", y);
    let namer = |op: &Op, ins: &[TensorType], out: &TensorType| backend.kernel_for(op, ins, out).unwrap();
    for (name, g) in [("add", &add), ("peek", &peek)] {
        let (e, _, _) = kiln_graph::lower::compile_entry(g, name, &mut program, &namer).unwrap();
        program.entries.push(e);
    }
    let mut s = Session::new(program, Arc::new(WeightStore::empty())).unwrap();
    let one = Tensor::from_f32(&[3], &[1.0, 2.0, 3.0]);
    assert_eq!(s.state("acc").unwrap().to_f32(), [0.0; 3]);
    s.run("add", &[("x", &one)]).unwrap();
    let out = s.run("add", &[("x", &one)]).unwrap();
    assert_eq!(out.len(), 1, "the state output is kept, not returned");
    assert_eq!(out[0].1.to_f32(), [2.0, 4.0, 6.0]);
    let twice = s.run("peek", &[]).unwrap();
    assert_eq!(twice[0].1.to_f32(), [4.0, 8.0, 12.0]);
    s.reset_states();
    assert_eq!(s.run("peek", &[]).unwrap()[0].1.to_f32(), [0.0; 3]);
    // A caller may also give the state explicitly.
    let given = s.run("peek", &[("acc", &one)]).unwrap();
    assert_eq!(given[0].1.to_f32(), [2.0, 4.0, 6.0]);
    assert_eq!(ty, s.state("acc").unwrap().ty);
}
