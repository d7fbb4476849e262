//! Tests of [`super`]: a folded RoPE rotation's launch, its addressing emulated on the host,
//! against the interpreter; the cases that must not fold.

use super::super::{kernel_for, layout, lower_entry, regions, rotation_kernels, with_kernel, Launch, Layout, Work};
use super::*;
use kiln_graph::interp::{run, Value};
use kiln_graph::program::{Program, Slot};
use kiln_graph::{DType, Graph, TensorType, UnaryOp};
use std::collections::HashMap;

/// RoPE of `x` `[1, 8, h, 8]` with `cos` and `sin` `[1, 8, 1, 8]`.
fn rope(g: &mut Graph, x: kiln_graph::NodeId, cos: kiln_graph::NodeId, sin: kiln_graph::NodeId) -> kiln_graph::NodeId {
    let hi = g.slice(x, 3, 4, 8).unwrap();
    let lo = g.slice(x, 3, 0, 4).unwrap();
    let n = g.unary(UnaryOp::Neg, hi).unwrap();
    let rot = g.concat(&[n, lo], 3).unwrap();
    let (a, b) = (g.mul(x, cos).unwrap(), g.mul(rot, sin).unwrap());
    g.add(a, b).unwrap()
}

/// Prefill's stacked Q, K and V as planes `[4, 8, 16]` (`-planes`: 8 rows, 2 heads of 8 per plane): q
/// is `permute(planes 0..2, [1, 0, 2])` read as `[1, 8, 4, 8]`, k plane 2 as `[1, 8, 2, 8]`;
/// both rotated.
fn stacked_rope(dt: DType) -> Graph {
    let mut g = Graph::new();
    let x = g.input("planes", dt, &[4, 8, 16]).unwrap();
    // A computed product (as the stacked GEMM's), so that its slices are views.
    let planes = g.unary(UnaryOp::Neg, x).unwrap();
    let cos = g.input("cos", dt, &[1, 8, 1, 8]).unwrap();
    let sin = g.input("sin", dt, &[1, 8, 1, 8]).unwrap();
    let q = g.slice(planes, 0, 0, 2).unwrap();
    let q = g.permute(q, &[1, 0, 2]).unwrap();
    let q = g.reshape(q, &[1, 8, 4, 8]).unwrap();
    let k = g.slice(planes, 0, 2, 3).unwrap();
    let k = g.reshape(k, &[1, 8, 2, 8]).unwrap();
    let yq = rope(&mut g, q, cos, sin);
    let yk = rope(&mut g, k, cos, sin);
    g.output("yq", yq);
    g.output("yk", yk);
    g
}

fn program(dt: DType) -> Program {
    let g = kiln_graph::passes::Pipeline::standard().run(&stacked_rope(dt), None).unwrap();
    let mut p = Program::new("rope", "cuda", "");
    let namer = |op: &Op, ins: &[TensorType], out: &TensorType| kernel_for(op, ins, out).unwrap();
    let (entry, _, _) = kiln_graph::lower::compile_entry(&g, "forward", &mut p, &namer).unwrap();
    p.entries.push(entry);
    rotation_kernels(&mut p);
    p
}

fn position(steps: &[Step], f: impl Fn(&Step) -> bool) -> usize {
    steps.iter().position(f).expect("the step")
}

fn is_permute(s: &Step) -> bool {
    matches!(s.op, Op::Permute { .. })
}

/// A step at `at` computing `exp(x)` where `x` is the entry's `cos` (an elementwise launch).
fn exp_into(steps: &[Step], at: &Operand) -> Step {
    let cos = steps.iter().flat_map(|s| &s.inputs).find(|o| o.ty.shape == [1, 8, 1, 8]).expect("cos").clone();
    let output = Operand { slot: at.slot, ty: cos.ty.clone() };
    with_kernel(Step { node: 0, op: Op::Unary(UnaryOp::Exp), kernel: String::new(), inputs: vec![cos], output })
}

/// The program's steps with a step overwriting q's permute output appended (the plan of a
/// longer entry reuses those bytes).
fn overwritten(p: &Program) -> Vec<Step> {
    let mut steps = p.entries[0].steps.clone();
    let at = steps[position(&steps, is_permute)].output.clone();
    steps.push(exp_into(&steps, &at));
    steps
}

fn value(dt: DType, shape: &[usize], f: &dyn Fn(usize) -> f64) -> Value {
    let n: usize = shape.iter().product();
    Value::new(TensorType::new(dt, shape.to_vec()), (0..n).map(f).collect()).unwrap()
}

/// What fused launch `k` (half `half` of a merged one) writes, computed as the kernel does
/// from its parameters over `mem` (element values by byte address): each input's offset from
/// its access, input 0 then moved through `perm`, the region `e` over the values read.
fn emulate(k: &Launch, half: usize, e: &kiln_graph::Expr, dts: &[DType], perm: &rotation::SignedPerm, mem: &HashMap<u64, f64>) -> Vec<f64> {
    let size = std::mem::size_of::<fused::FusedParams>();
    let bytes = &k.params[half * size..(half + 1) * size];
    // SAFETY: a fused launch's parameter block is a `FusedParams`' bytes.
    let p: fused::FusedParams = unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const fused::FusedParams) };
    let dtypes = e.dtypes(dts).unwrap();
    let mut scratch = Vec::new();
    (0..p.n)
        .map(|x| {
            let mut o: Vec<i64> = (0..dts.len()).map(|i| if p.access[i] == 0 { x } else { 0 }).collect();
            if p.strided == 1 {
                let mut rem = x;
                for a in (0..p.rank as usize).rev() {
                    let ia = rem % p.dims[a];
                    rem /= p.dims[a];
                    for (i, oi) in o.iter_mut().enumerate() {
                        if p.access[i] == 2 {
                            *oi += ia * p.st[i][a];
                        }
                    }
                }
            }
            let c = (o[0] % perm.d as i64) as usize;
            let (src, neg) = perm.source_of(c).unwrap();
            o[0] += src as i64 - c as i64;
            let at = |i: usize| mem[&(p.ins[i] + (o[i] as u64) * dts[i].size() as u64)];
            let mut vals = vec![at(0) * if neg { -1.0 } else { 1.0 }];
            vals.extend((1..dts.len()).map(at));
            e.eval(&vals, &mut scratch, &dtypes)
        })
        .collect()
}

/// q's rotation folds its permute: the permute makes no launch, the two rotations still run as
/// one launch, and the launch read as the kernel reads it gives the interpreter's values bit
/// for bit; the kernel compiles with NVRTC.
#[test]
fn a_folded_rotation_reads_the_planes_as_the_interpreter() {
    for dt in [DType::BF16, DType::F32] {
        let p = program(dt);
        let l = layout(&p).unwrap();
        let steps = overwritten(&p);
        let at = position(&steps, is_permute);
        let rot = position(&steps, |s| rotation::of_step(s, &l.rotations).is_some() && same_bytes(&s.inputs[0], &steps[at].output, &l));
        let low = lower_entry(&steps, &l, &|_| true).unwrap();
        assert!(low.work[at].is_empty() && low.absorbed.contains(&(at, rot)), "{dt}: {:?}", low.absorbed);
        let merged = low.pairs.iter().find(|&&(a, b)| a == rot || b == rot).expect("q's and k's rotations as one launch");
        let [Work::Kernel(k)] = low.work[merged.1].as_slice() else { panic!("{:?}", low.work[merged.1]) };
        assert!(k.kernel.starts_with("fused_rot_") && k.kernel.ends_with("_x2"), "{}", k.kernel);
        let region = regions(&p).unwrap().into_iter().find(|r| format!("{}_x2", r.name) == k.kernel).expect("its region");
        if kiln_kernels::cuda::nvrtc::available() {
            kiln_kernels::cuda::nvrtc::compile(&region.name, &region.source, "sm_90a").unwrap_or_else(|e| panic!("{e}\n{}", region.source));
        } else {
            assert!(std::env::var("KILN_REQUIRE_NVRTC").map_or(true, |v| v != "1"), "KILN_REQUIRE_NVRTC=1 but NVRTC is missing");
        }
        // The interpreter on the graph as built; the entry's inputs placed in a host arena.
        let ins: HashMap<String, Value> = [
            ("planes".to_string(), value(dt, &[4, 8, 16], &|i| ((i * 37) % 101) as f64 / 16.0 - 3.0)),
            ("cos".to_string(), value(dt, &[1, 8, 1, 8], &|i| ((i * 7) % 11) as f64 / 16.0 - 0.25)),
            ("sin".to_string(), value(dt, &[1, 8, 1, 8], &|i| ((i * 5) % 13) as f64 / 32.0 - 0.2)),
        ]
        .into();
        let want = run(&stacked_rope(dt), &ins, &HashMap::new()).unwrap();
        let mut mem = HashMap::new();
        for io in &p.entries[0].inputs {
            let Slot::Arena { offset, .. } = io.operand.slot else { panic!("{:?}", io.operand.slot) };
            for (i, &v) in ins[&io.name].data.iter().enumerate() {
                mem.insert((l.arena + offset + i * dt.size()) as u64, v);
            }
        }
        // `-planes` (negation is exact), where its step writes it.
        let neg = steps.iter().find(|s| s.output.ty.shape == [4, 8, 16]).expect("-planes");
        for (i, &v) in ins["planes"].data.iter().enumerate() {
            mem.insert(addr(&neg.output, &l).unwrap() + (i * dt.size()) as u64, -v);
        }
        let s = &steps[rot];
        let Op::MatMul { epilogue: Some(e), .. } = &s.op else { panic!("{:?}", s.op) };
        let mut dts = vec![s.inputs[0].ty.dtype];
        dts.extend(s.inputs[2..].iter().map(|o| o.ty.dtype));
        let out = addr(&s.output, &l).unwrap();
        let half = (0..2).find(|&h| k.params[h * std::mem::size_of::<fused::FusedParams>()..][..8] == out.to_le_bytes()).expect("q's half");
        let perm = rotation::of_step(s, &l.rotations).unwrap();
        let got = emulate(k, half, e, &dts, perm, &mem);
        let same = got.len() == want["yq"].data.len() && got.iter().zip(&want["yq"].data).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{dt}: {got:?}\n{:?}", want["yq"].data);
    }
}

/// The folded geometry of prefill's q at Gemma 2 2B's shapes: planes `[2, L, 4 * 256]` read
/// as `[1, L, 8, 256]` is `[L, 2, 4, 256]` with the planes' strides.
#[test]
fn prefills_q_refines_to_rows_planes_heads_columns() {
    let g = refine(&[1, 1024, 8, 256], &[1024, 2, 1024]).unwrap();
    assert_eq!(g.iter().map(|a| a.len).collect::<Vec<_>>(), [1024, 2, 4, 256]);
    let src = contiguous(&[2, 1024, 1024]);
    let read: Vec<usize> = [1, 0, 2].iter().map(|&a| src[a]).collect();
    assert_eq!(g.iter().map(|a| read[a.o] * a.o_inner).collect::<Vec<_>>(), [1024, 1024 * 1024, 256, 1]);
    // Suffix products 3 and 2 of one size 6: no shape refines both.
    assert_eq!(refine(&[2, 3], &[3, 2]), None);
}

/// No fold: the output is never overwritten (it may be an entry's output), another step reads
/// it (a copy), or a step between the permute and the rotation writes the planes.
#[test]
fn a_permute_with_another_reader_or_an_overwritten_source_keeps_its_launch() {
    let p = program(DType::BF16);
    let l: Layout = layout(&p).unwrap();
    let base = overwritten(&p);
    let at = position(&base, is_permute);
    let rot = position(&base, |s| rotation::of_step(s, &l.rotations).is_some() && same_bytes(&s.inputs[0], &base[at].output, &l));
    let folds = |steps: &[Step]| lower_entry(steps, &l, &|_| true).unwrap().work[at].is_empty();
    assert!(folds(&base));
    let mut last_write_elsewhere = base.clone();
    last_write_elsewhere.pop();
    let live =
        p.entries[0].steps.iter().skip(at + 1).any(|s| overlaps(range(&s.output, &l).unwrap(), range(&base[at].output, &l).unwrap()));
    assert!(live || !folds(&last_write_elsewhere), "never overwritten, yet folded");
    // A second permute of q's bytes (a copy launch) reads the output too.
    let mut copied = base.clone();
    let mut copy = base[at].clone();
    copy.inputs = vec![base[at].output.clone()];
    copy.op = Op::Permute { perm: vec![0, 2, 1] };
    copy.output = Operand { slot: Slot::Arena { offset: l.arena_bytes, bytes: copy.output.ty.bytes() }, ..copy.output.clone() };
    copy.output.ty = TensorType::new(DType::BF16, [8, 16, 2]);
    copied.insert(rot, with_kernel(copy));
    assert!(!folds(&copied));
    // A step between the permute and the rotation writes the planes q reads.
    let mut clobbered = base.clone();
    let src = base[at].inputs[0].clone();
    clobbered.insert(rot, exp_into(&base, &src));
    assert!(!folds(&clobbered));
    // Written after the last reader (the rotation), the planes may change: it still folds.
    let mut later = base.clone();
    later.insert(base.len() - 1, exp_into(&base, &src));
    assert!(folds(&later));
}
