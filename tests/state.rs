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
        weight_sets: vec![],
        tuning: vec![],
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
    assert_eq!(s.state("acc").unwrap().unwrap().to_f32(), [0.0; 3]);
    s.run("add", &[("x", &one)]).unwrap();
    let out = s.run("add", &[("x", &one)]).unwrap();
    assert_eq!(out.len(), 1, "the state output is kept, not returned");
    assert_eq!(out[0].1.to_f32(), [2.0, 4.0, 6.0]);
    let twice = s.run("peek", &[]).unwrap();
    assert_eq!(twice[0].1.to_f32(), [4.0, 8.0, 12.0]);
    s.reset_states().unwrap();
    assert_eq!(s.run("peek", &[]).unwrap()[0].1.to_f32(), [0.0; 3]);
    // A caller may also give the state explicitly.
    let given = s.run("peek", &[("acc", &one)]).unwrap();
    assert_eq!(given[0].1.to_f32(), [2.0, 4.0, 6.0]);
    assert_eq!(ty, s.state("acc").unwrap().unwrap().ty);
}

/// A decode-like entry writes one row per run into its state in place (the write step's
/// output is the state itself), a prefill-like entry computes the whole state into it, and
/// readers of the old value run before the write.
#[test]
fn write_slice_updates_a_state_in_place() {
    use kiln_graph::program::Slot;
    let ty = TensorType::new(DType::F32, [2, 4, 1]);
    let backend = kiln_runtime::by_name("cpu").unwrap();
    let mut program = Program {
        model: "cache".into(),
        backend: "cpu".into(),
        source: String::new(),
        weights: vec![],
        constants: vec![],
        entries: vec![],
        states: vec![StateSpec { name: "c".into(), ty: ty.clone() }],
        binaries: vec![],
        weight_sets: vec![],
        tuning: vec![],
    };
    let mut fill = Graph::new();
    let x = fill.input("x", DType::F32, &[2, 4, 1]).unwrap();
    let y = fill.mul_scalar(x, 10.0).unwrap();
    fill.output("c", y);
    let mut step = Graph::new();
    let c = step.input("c", DType::F32, &[2, 4, 1]).unwrap();
    let new = step.input("new", DType::F32, &[2, 1, 1]).unwrap();
    let at = step.input("at", DType::I64, &[1]).unwrap();
    let old_sum = step.reduce(kiln_graph::ReduceOp::Sum, c, &[1, 2], false).unwrap();
    let w = step.write_slice(c, new, at, 1).unwrap();
    let new_sum = step.reduce(kiln_graph::ReduceOp::Sum, w, &[1, 2], false).unwrap();
    step.output("c", w);
    step.output("old", old_sum);
    step.output("new", new_sum);
    let namer = |op: &Op, ins: &[TensorType], out: &TensorType| backend.kernel_for(op, ins, out).unwrap();
    for (name, g) in [("fill", &fill), ("step", &step)] {
        let (e, _, _) = kiln_graph::lower::compile_entry(g, name, &mut program, &namer).unwrap();
        program.entries.push(e);
    }
    let ws = program.entries[1].steps.iter().find(|s| s.kernel == "cpu.write_slice").unwrap();
    assert_eq!((ws.inputs[0].slot, ws.output.slot), (Slot::State(0), Slot::State(0)));
    assert_eq!(program.entries[0].steps.last().unwrap().output.slot, Slot::State(0));
    let mut s = Session::new(program, Arc::new(WeightStore::empty())).unwrap();
    let x = Tensor::from_f32(&[2, 4, 1], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
    assert!(s.run("fill", &[("x", &x)]).unwrap().is_empty());
    assert_eq!(s.state("c").unwrap().unwrap().to_f32(), [10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0]);
    let new = Tensor::from_f32(&[2, 1, 1], &[-1.0, -2.0]);
    let out = s.run("step", &[("new", &new), ("at", &Tensor::from_i64(&[1], &[2]))]).unwrap();
    let get = |n: &str| out.iter().find(|(k, _)| k == n).unwrap().1.to_f32();
    assert_eq!(get("old"), [100.0, 260.0]);
    assert_eq!(get("new"), [100.0 - 30.0 - 1.0, 260.0 - 70.0 - 2.0]);
    assert_eq!(s.state("c").unwrap().unwrap().to_f32(), [10.0, 20.0, -1.0, 40.0, 50.0, 60.0, -2.0, 80.0]);
    let far = s.run("step", &[("new", &new), ("at", &Tensor::from_i64(&[1], &[4]))]).unwrap_err();
    assert!(far.to_string().contains("does not fit 4"), "{far}");
    s.reset_states().unwrap();
    assert_eq!(s.state("c").unwrap().unwrap().to_f32(), [0.0; 8]);
    assert!(s.state("nope").unwrap().is_none());
}

/// `gather_state_rows` reorders every state's batch rows in place on the backend (rows
/// repeated and left out, as beam search keeps them), leaves the other rows' bytes alone, and
/// refuses an index past the batch or a row count other than the states' leading axis.
fn gather_rows_on(backend_name: &str) {
    let tys = [TensorType::new(DType::F32, [4, 3, 2]), TensorType::new(DType::F32, [4, 5])];
    let backend = kiln_runtime::by_name(backend_name).unwrap();
    let mut program = Program {
        model: "rows".into(),
        backend: backend_name.into(),
        source: String::new(),
        weights: vec![],
        constants: vec![],
        entries: vec![],
        states: vec![StateSpec { name: "a".into(), ty: tys[0].clone() }, StateSpec { name: "b".into(), ty: tys[1].clone() }],
        binaries: vec![],
        weight_sets: vec![],
        tuning: vec![],
    };
    let mut set = Graph::new();
    for (name, ty) in ["a", "b"].iter().zip(&tys) {
        let x = set.input(&format!("x{name}"), DType::F32, &ty.shape).unwrap();
        let y = set.mul_scalar(x, 1.0).unwrap();
        set.output(*name, y);
    }
    let namer = |op: &Op, ins: &[TensorType], out: &TensorType| backend.kernel_for(op, ins, out).unwrap();
    let (e, _, _) = kiln_graph::lower::compile_entry(&set, "set", &mut program, &namer).unwrap();
    program.entries.push(e);
    let mut s = Session::new(program, Arc::new(WeightStore::empty())).unwrap();
    let vals: Vec<Vec<f32>> = tys.iter().enumerate().map(|(k, t)| (0..t.numel()).map(|i| (100 * k + i) as f32).collect()).collect();
    let (xa, xb) = (Tensor::from_f32(&tys[0].shape, &vals[0]), Tensor::from_f32(&tys[1].shape, &vals[1]));
    s.run("set", &[("xa", &xa), ("xb", &xb)]).unwrap();
    let rows = [2, 0, 2, 3];
    s.gather_state_rows(&rows).unwrap();
    for (k, name) in ["a", "b"].iter().enumerate() {
        let row = vals[k].len() / 4;
        let want: Vec<f32> = rows.iter().flat_map(|&r| vals[k][r * row..(r + 1) * row].to_vec()).collect();
        assert_eq!(s.state(name).unwrap().unwrap().to_f32(), want, "{backend_name}: state {name}");
    }
    // Twice more: a permutation applied to the gathered rows composes.
    s.gather_state_rows(&[3, 2, 1, 0]).unwrap();
    let row = vals[1].len() / 4;
    let want: Vec<f32> = [3, 2, 0, 2].iter().flat_map(|&r| vals[1][r * row..(r + 1) * row].to_vec()).collect();
    assert_eq!(s.state("b").unwrap().unwrap().to_f32(), want, "{backend_name}: composed");
    let e = s.gather_state_rows(&[0, 1, 4, 0]).unwrap_err().to_string();
    assert!(e.contains("row 4 is out of range"), "{e}");
    let e = s.gather_state_rows(&[0, 1]).unwrap_err().to_string();
    assert!(e.contains("leading axis must be the batch"), "{e}");
}

#[test]
fn gather_state_rows_cpu() {
    gather_rows_on("cpu");
}

#[cfg(feature = "cube")]
#[test]
fn gather_state_rows_cube() {
    gather_rows_on("cube");
}
