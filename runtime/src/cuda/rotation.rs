//! RoPE's rotation GEMM (`x @ P`, `P` a constant signed permutation made by
//! `kiln_graph::passes::rotation_as_matmul`) as one elementwise kernel on the cuda backend:
//! `out[.., i] = epilogue(sign_i * x[.., perm_i], ..)`. The product has one nonzero term per
//! element, so reading that term is exact where cuBLASLt would spend a launch on it and a
//! second one on the epilogue. The permutation (`crate::rotation`) is kept as a few runs of
//! columns (RoPE's rotate_half has two), written into the kernel's source as constants. A step
//! is named from its types when compiled (the GEMM's name); the backend then names it
//! `fused_rot_*` from the program's constants (`Backend::name_kernels`), and the lowering
//! accepts either name.

pub use crate::rotation::{of_constants, of_step, signed_permutation, Run, SignedPerm, MAX_RUNS};

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_graph::program::ConstData;
    use kiln_graph::{DType, Op, TensorType};

    /// `P` for `out[dst] = sign * x[src]` from `(src, sign)` per output column.
    fn matrix(map: &[(usize, f64)]) -> ConstData {
        let d = map.len();
        let mut values = vec![0.0; d * d];
        for (dst, &(src, sign)) in map.iter().enumerate() {
            values[src * d + dst] = sign;
        }
        ConstData { ty: TensorType::new(DType::BF16, [d, d]), values }
    }

    #[test]
    fn rotate_half_is_two_runs() {
        // rotate_half over 8 columns: out = concat(-x[4..8], x[0..4]).
        let map: Vec<(usize, f64)> = (0..8).map(|c| if c < 4 { (c + 4, -1.0) } else { (c - 4, 1.0) }).collect();
        let p = signed_permutation(&matrix(&map)).unwrap();
        assert_eq!(p.runs, [Run { dst: 0, len: 4, src: 4, neg: true }, Run { dst: 4, len: 4, src: 0, neg: false }]);
        for (c, &(src, sign)) in map.iter().enumerate() {
            assert_eq!(p.source_of(c), Some((src, sign < 0.0)));
        }
    }

    #[test]
    fn other_matrices_are_not_permutations() {
        let id: Vec<(usize, f64)> = (0..4).map(|c| (c, 1.0)).collect();
        assert_eq!(signed_permutation(&matrix(&id)).unwrap().runs.len(), 1);
        let mut twice = matrix(&id);
        twice.values[1] = 1.0; // column 1 reads rows 0 and 1
        let mut scaled = matrix(&id);
        scaled.values[0] = 2.0;
        let mut reused = matrix(&id);
        reused.values[5] = 0.0;
        reused.values[1] = 1.0; // rows 0 feeds columns 0 and 1, row 1 none
        let many: Vec<(usize, f64)> = (0..2 * MAX_RUNS + 2).map(|c| (c ^ 1, 1.0)).collect();
        for c in [twice, scaled, reused, matrix(&many)] {
            assert_eq!(signed_permutation(&c), None, "{:?}", c.values);
        }
    }

    /// RoPE on q `[1, 3, 2, 8]`: `q * cos + rotate_half(q) * sin`, cos and sin `[1, 3, 1, 8]`.
    fn rope(dt: DType) -> kiln_graph::Graph {
        let mut g = kiln_graph::Graph::new();
        let q = g.input("q", dt, &[1, 3, 2, 8]).unwrap();
        let cos = g.input("cos", dt, &[1, 3, 1, 8]).unwrap();
        let sin = g.input("sin", dt, &[1, 3, 1, 8]).unwrap();
        let hi = g.slice(q, 3, 4, 8).unwrap();
        let lo = g.slice(q, 3, 0, 4).unwrap();
        let n = g.unary(kiln_graph::UnaryOp::Neg, hi).unwrap();
        let rot = g.concat(&[n, lo], 3).unwrap();
        let (a, b) = (g.mul(q, cos).unwrap(), g.mul(rot, sin).unwrap());
        let y = g.add(a, b).unwrap();
        g.output("y", y);
        g
    }

    /// The compiled rotation step lowers to one elementwise launch, and reading the product as
    /// `sign * x[.., perm]` (what the kernel does) then its epilogue gives the interpreter's
    /// values bit for bit; the kernel compiles with NVRTC.
    #[test]
    fn rope_rotation_is_one_launch_equal_to_the_interpreter() {
        use super::super::lower::{kernel_for, layout, lower_step, regions, Work};
        use kiln_graph::interp::{run, Value};
        use std::collections::HashMap;
        for dt in [DType::BF16, DType::F32] {
            let g = kiln_graph::passes::Pipeline::standard().run(&rope(dt), None).unwrap();
            let mut p = kiln_graph::program::Program::new("rope", "cuda", "");
            let namer = |op: &Op, ins: &[TensorType], out: &TensorType| kernel_for(op, ins, out).unwrap();
            let (entry, _, _) = kiln_graph::lower::compile_entry(&g, "forward", &mut p, &namer).unwrap();
            p.entries.push(entry);
            let l = layout(&p).unwrap();
            // Named from its types (the GEMM and its epilogue), then from the constants too.
            let at = p.entries[0].steps.iter().position(|s| matches!(s.op, Op::MatMul { .. })).expect("the rotation matmul");
            let gemm_name = p.entries[0].steps[at].kernel.clone();
            assert!(gemm_name.starts_with("cublaslt.gemm_"), "{gemm_name}");
            assert_eq!(lower_step(&p.entries[0].steps[at], &l).unwrap().len(), 1, "one launch under either name");
            super::super::lower::rotation_kernels(&mut p);
            let steps = &p.entries[0].steps;
            let s = steps.iter().find(|s| matches!(s.op, Op::MatMul { .. })).expect("the rotation matmul");
            let perm = of_step(s, &l.rotations).expect("a signed permutation");
            let work = lower_step(s, &l).unwrap();
            let [Work::Kernel(k)] = &work[..] else { panic!("{work:?}") };
            assert!(k.kernel.starts_with("fused_rot_") && k.kernel == s.kernel, "{} {}", k.kernel, s.kernel);
            let region = regions(&p).unwrap().into_iter().find(|r| r.name == k.kernel).expect("its source among the regions");
            // rotate_half over 8 columns: columns 0..4 read -x[c + 4], columns 4..8 read x[c - 4].
            for line in
                ["const i64 c = o0 % 8;", "if (c < 4) { sign0 = -1.0f; o0 += 4; }", "else { o0 += -4; }", "(sign0 * to_f32(((const "]
            {
                assert!(region.source.contains(line), "{line} not in\n{}", region.source);
            }
            if kiln_kernels::cuda::nvrtc::available() {
                kiln_kernels::cuda::nvrtc::compile(&region.name, &region.source, "sm_90a")
                    .unwrap_or_else(|e| panic!("{e}\n{}", region.source));
            } else {
                assert!(std::env::var("KILN_REQUIRE_NVRTC").map_or(true, |v| v != "1"), "KILN_REQUIRE_NVRTC=1 but NVRTC is missing");
            }
            // The interpreter on the graph as built, against the kernel's arithmetic on the host.
            let val = |shape: &[usize], f: &dyn Fn(usize) -> f64| {
                let n: usize = shape.iter().product();
                Value::new(TensorType::new(dt, shape.to_vec()), (0..n).map(f).collect()).unwrap()
            };
            let ins: HashMap<String, Value> = [
                ("q".to_string(), val(&[1, 3, 2, 8], &|i| (i as f64 - 21.0) / 8.0)),
                ("cos".to_string(), val(&[1, 3, 1, 8], &|i| ((i * 7) % 11) as f64 / 16.0 - 0.25)),
                ("sin".to_string(), val(&[1, 3, 1, 8], &|i| ((i * 5) % 13) as f64 / 32.0 - 0.2)),
            ]
            .into();
            let want = run(&rope(dt), &ins, &HashMap::new()).unwrap();
            let named = |o: &kiln_graph::program::Operand| {
                let io = p.entries[0].inputs.iter().find(|io| io.operand.slot == o.slot).expect("an entry input");
                &ins[&io.name]
            };
            let (x, extra): (&Value, Vec<&Value>) = (named(&s.inputs[0]), s.inputs[2..].iter().map(named).collect());
            let Op::MatMul { epilogue: Some(e), .. } = &s.op else { panic!("{:?}", s.op) };
            let mut scratch = Vec::new();
            let mut dts = vec![x.ty.dtype];
            dts.extend(extra.iter().map(|t| t.ty.dtype));
            let dtypes = e.dtypes(&dts).unwrap();
            for (i, &w) in want["y"].data.iter().enumerate() {
                let c = i % 8;
                let (src, neg) = perm.source_of(c).unwrap();
                let v0 = x.data[i - c + src] * if neg { -1.0 } else { 1.0 };
                // cos and sin broadcast over the heads axis: element (s, c) for output (s, h, c);
                // q itself (read by `q * cos`) is not broadcast.
                let mut vals = vec![v0];
                vals.extend(extra.iter().map(|t| t.data[if t.data.len() == 24 { (i / 16) * 8 + c } else { i }]));
                assert_eq!(e.eval(&vals, &mut scratch, &dtypes), w, "{dt} element {i}");
            }
        }
    }
}
