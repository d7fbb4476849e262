//! Fused elementwise regions as CUDA C: one kernel per distinct region (expression and
//! dtypes), straight-line code. Every value has its own dtype ([`kiln_graph::Expr::dtypes`]:
//! an input's, a cast's target, its operands'); float and bool values are computed in f32,
//! integer ones in f64, and each is rounded to its dtype, as the interpreter does
//! ([`kiln_graph::Expr::eval`]), so a region holding casts (an i64 position to f32, an f32
//! angle to bf16) computes what its unfused chain does. The output is the last value
//! converted to the output's dtype (a plain cast step is `Input(0)` stored in its target
//! type). The kernels read their operands through `kiln_kernels::cuda::fused::FusedParams`
//! (declared there, with its C twin).

use super::rotation::SignedPerm;
use kiln_graph::{BinaryOp, DType, Expr, Instr, UnaryOp};
use kiln_kernels::cuda::fused::{MAX_INPUTS, PARAMS_C};
use std::fmt::Write;

/// The C storage type of a dtype.
pub fn c_type(d: DType) -> &'static str {
    match d {
        DType::F32 => "float",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::I32 => "int",
        DType::I64 => "i64",
        DType::U8 | DType::Bool => "u8",
    }
}

/// The C type a value of dtype `d` is computed in: float for floats and bools, double for
/// integers (exact below 2^53).
fn compute_type(d: DType) -> &'static str {
    if d.is_float() || d == DType::Bool {
        "float"
    } else {
        "double"
    }
}

/// Stable kernel name of a region: FNV-1a of its instructions and dtypes.
pub fn kernel_name(expr: &Expr, inputs: &[DType], out: DType) -> String {
    format!("fused_{:016x}", fnv(&format!("{:?}|{:?}|{:?}", expr.instrs, inputs, out)))
}

/// Stable kernel name of a region whose input 0 is read through a signed permutation of its
/// last axis (`rotation`): the region's hash and the permutation's.
pub fn rotation_kernel_name(expr: &Expr, inputs: &[DType], out: DType, perm: &SignedPerm) -> String {
    format!("fused_rot_{:016x}", fnv(&format!("{:?}|{:?}|{:?}|{:?}", expr.instrs, inputs, out, perm)))
}

fn fnv(text: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in text.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

fn unary(op: UnaryOp, x: &str, f: bool) -> String {
    // f: single precision (float) math; otherwise double.
    let m = |name: &str| if f { format!("{name}f({x})") } else { format!("{name}({x})") };
    let one = if f { "1.0f" } else { "1.0" };
    match op {
        UnaryOp::Neg => format!("-{x}"),
        UnaryOp::Abs => m("fabs"),
        UnaryOp::Exp => m("exp"),
        UnaryOp::Log => m("log"),
        UnaryOp::Sqrt => m("sqrt"),
        UnaryOp::Rsqrt => format!("{one} / {}", m("sqrt")),
        UnaryOp::Recip => format!("{one} / {x}"),
        UnaryOp::Square => format!("{x} * {x}"),
        UnaryOp::Tanh => m("tanh"),
        UnaryOp::Sigmoid => format!("{one} / ({one} + {})", if f { format!("expf(-{x})") } else { format!("exp(-{x})") }),
        UnaryOp::Erf => m("erf"),
        UnaryOp::Sin => m("sin"),
        UnaryOp::Cos => m("cos"),
        UnaryOp::Floor => m("floor"),
        UnaryOp::Relu => format!("({x} > 0 ? {x} : 0)"),
        UnaryOp::GeluTanh => {
            let t = if f { "tanhf" } else { "tanh" };
            format!("0.5f * {x} * ({one} + {t}(0.7978845608f * ({x} + 0.044715f * {x} * {x} * {x})))")
        }
        UnaryOp::GeluErf => {
            let e = if f { "erff" } else { "erf" };
            format!("0.5f * {x} * ({one} + {e}({x} * 0.7071067812f))")
        }
        UnaryOp::Silu => format!("{x} / ({one} + {})", if f { format!("expf(-{x})") } else { format!("exp(-{x})") }),
        UnaryOp::Softplus => {
            if f {
                format!("({x} > 30.0f ? {x} : log1pf(expf({x})))")
            } else {
                format!("({x} > 30.0 ? {x} : log1p(exp({x})))")
            }
        }
        UnaryOp::Not => format!("({x} == 0 ? 1 : 0)"),
    }
}

fn binary(op: BinaryOp, a: &str, b: &str, f: bool) -> String {
    let t = |c: &str| format!("({a} {c} {b} ? 1 : 0)");
    match op {
        BinaryOp::Add => format!("{a} + {b}"),
        BinaryOp::Sub => format!("{a} - {b}"),
        BinaryOp::Mul => format!("{a} * {b}"),
        BinaryOp::Div => format!("{a} / {b}"),
        BinaryOp::Max => format!("{}({a}, {b})", if f { "fmaxf" } else { "fmax" }),
        BinaryOp::Min => format!("{}({a}, {b})", if f { "fminf" } else { "fmin" }),
        BinaryOp::Pow => format!("{}({a}, {b})", if f { "powf" } else { "pow" }),
        BinaryOp::Eq => t("=="),
        BinaryOp::Ne => t("!="),
        BinaryOp::Lt => t("<"),
        BinaryOp::Le => t("<="),
        BinaryOp::Gt => t(">"),
        BinaryOp::Ge => t(">="),
        BinaryOp::And => format!("({a} != 0 && {b} != 0 ? 1 : 0)"),
        BinaryOp::Or => format!("({a} != 0 || {b} != 0 ? 1 : 0)"),
    }
}

/// Rounds a compute value to its dtype (the interpreter's per-instruction rounding).
fn round(d: DType, v: &str) -> String {
    match d {
        DType::F32 => v.to_string(),
        DType::BF16 => format!("to_f32(from_f32<bf16>({v}))"),
        DType::F16 => format!("to_f32(from_f32<f16>({v}))"),
        DType::I32 => format!("(double)(int)(i64)({v})"),
        DType::I64 => format!("trunc({v})"),
        DType::U8 => format!("(double)(u8)(i64)({v})"),
        DType::Bool => format!("({v} != 0 ? 1.0 : 0.0)"),
    }
}

/// The kernel of one region: its name and complete source (helpers included). Errors name
/// what the generator does not support. With `perm`, input 0 is read through a signed
/// permutation of the last axis: element `[.., c]` of input 0 is `sign_c * x[.., perm_c]`
/// (RoPE's rotation GEMM, see `super::rotation`); input 0 must then have the output's shape.
pub fn source(expr: &Expr, inputs: &[DType], out: DType, perm: Option<&SignedPerm>) -> Result<(String, String), String> {
    if inputs.len() > MAX_INPUTS {
        return Err(format!("a fused region of {} inputs (the CUDA generator takes at most {MAX_INPUTS})", inputs.len()));
    }
    if expr.instrs.is_empty() {
        return Err("an empty fused region".into());
    }
    if expr.arity() > inputs.len() {
        return Err(format!("the region reads input {} but the step has {}", expr.arity() - 1, inputs.len()));
    }
    let name = match perm {
        Some(p) => rotation_kernel_name(expr, inputs, out, p),
        None => kernel_name(expr, inputs, out),
    };
    if perm.is_some() && inputs.first().is_none_or(|d| !d.is_float()) {
        return Err("a permuted read of a non-float input".into());
    }
    let dtypes = expr.dtypes(inputs)?;
    let mut s = String::new();
    s.push_str(kiln_kernels::cuda::COMMON);
    s.push_str(PARAMS_C);
    // The body reads its parameters through a reference, so that the `_x2` entry (two
    // independent launches as one: the lowering's `merge`) runs it on half `blockIdx.y`.
    let _ = writeln!(s, "__device__ __forceinline__ void {name}_body(const FusedParams& p) {{");
    let _ = writeln!(s, "  for (i64 x = blockIdx.x * (i64)blockDim.x + threadIdx.x; x < p.n; x += (i64)gridDim.x * blockDim.x) {{");
    for i in 0..inputs.len() {
        let _ = writeln!(s, "    i64 o{i} = p.access[{i}] == 0 ? x : 0;");
    }
    let _ = writeln!(s, "    if (p.strided) {{");
    let _ = writeln!(s, "      i64 rem = x;");
    let _ = writeln!(s, "      for (int a = p.rank - 1; a >= 0; a--) {{");
    let _ = writeln!(s, "        i64 ia = rem % p.dims[a];");
    let _ = writeln!(s, "        rem /= p.dims[a];");
    for i in 0..inputs.len() {
        let _ = writeln!(s, "        if (p.access[{i}] == 2) o{i} += ia * p.st[{i}][a];");
    }
    let _ = writeln!(s, "      }}");
    let _ = writeln!(s, "    }}");
    if let Some(p) = perm {
        permuted_offset(&mut s, p);
    }
    for (v, (ins, &d)) in expr.instrs.iter().zip(&dtypes).enumerate() {
        let ct = compute_type(d);
        // Single-precision math where the operands are floats.
        let f = ins.operands().first().is_none_or(|&a| compute_type(dtypes[a as usize]) == "float");
        let rhs = match *ins {
            Instr::Input(k) => {
                let d = inputs[k as usize];
                let load = format!("((const {}*)p.ins[{k}])[o{k}]", c_type(d));
                if k == 0 && perm.is_some() {
                    format!("({ct})(sign0 * to_f32({load}))")
                } else if d.is_float() {
                    format!("({ct})to_f32({load})")
                } else {
                    format!("({ct}){load}")
                }
            }
            Instr::Const(c) => {
                if c.is_finite() {
                    format!("({ct}){:?}", c as f64)
                } else if c.is_nan() {
                    format!("({ct})__int_as_float(0x7fc00000)")
                } else if c > 0.0 {
                    format!("({ct})KILN_INF")
                } else {
                    format!("({ct})-KILN_INF")
                }
            }
            Instr::Unary(op, a) => unary(op, &format!("v{a}"), f),
            Instr::Binary(op, a, b) => binary(op, &format!("v{a}"), &format!("v{b}"), f),
            Instr::Select(c, a, b) => format!("(v{c} != 0 ? v{a} : v{b})"),
            Instr::Cast(_, a) => format!("v{a}"),
        };
        let _ = writeln!(s, "    const {ct} v{v} = {};", round(d, &format!("({ct})({rhs})")));
    }
    let last = expr.instrs.len() - 1;
    let store = match out {
        DType::F32 | DType::BF16 | DType::F16 => format!("from_f32<{}>((float)v{last})", c_type(out)),
        DType::Bool => format!("(u8)(v{last} != 0 ? 1 : 0)"),
        DType::I32 | DType::I64 | DType::U8 => format!("({})(i64)v{last}", c_type(out)),
    };
    let _ = writeln!(s, "    (({}*)p.out)[x] = {store};", c_type(out));
    let _ = writeln!(s, "  }}\n}}");
    let _ =
        writeln!(s, "extern \"C\" __global__ void __launch_bounds__(256) {name}(const FusedParams p) {{ pdl_enter(); {name}_body(p); }}");
    let _ = writeln!(s, "struct FusedParams2 {{\n  FusedParams p[2];\n}};");
    let _ = writeln!(
        s,
        "extern \"C\" __global__ void __launch_bounds__(256) {name}_x2(const FusedParams2 p) {{ pdl_enter(); {name}_body(p.p[blockIdx.y]); }}"
    );
    Ok((name, s))
}

/// Moves `o0` (input 0's offset for this element) to the column `perm` reads, and sets
/// `sign0`: one branch per run of the permutation.
fn permuted_offset(s: &mut String, p: &SignedPerm) {
    let _ = writeln!(s, "    float sign0 = 1.0f;");
    let _ = writeln!(s, "    {{");
    let _ = writeln!(s, "      const i64 c = o0 % {};", p.d);
    for (i, r) in p.runs.iter().enumerate() {
        // Runs cover the columns in order: the last needs no test.
        let cond = match (i == 0, i + 1 == p.runs.len()) {
            (true, true) => String::new(),
            (true, false) => format!("if (c < {}) ", r.dst + r.len),
            (false, false) => format!("else if (c < {}) ", r.dst + r.len),
            (false, true) => "else ".to_string(),
        };
        let sign = if r.neg { "sign0 = -1.0f; " } else { "" };
        let _ = writeln!(s, "      {cond}{{ {sign}o0 += {}; }}", r.src as i64 - r.dst as i64);
    }
    let _ = writeln!(s, "    }}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_kernels::cuda::nvrtc;

    fn gelu_add() -> Expr {
        Expr { instrs: vec![Instr::Input(0), Instr::Input(1), Instr::Binary(BinaryOp::Add, 0, 1), Instr::Unary(UnaryOp::GeluTanh, 2)] }
    }

    #[test]
    fn a_region_becomes_straight_line_code() {
        let (name, src) = source(&gelu_add(), &[DType::BF16, DType::BF16], DType::BF16, None).unwrap();
        assert!(name.starts_with("fused_"));
        assert!(src.contains(&format!("void __launch_bounds__(256) {name}(const FusedParams p)")));
        assert!(src.contains("const float v2 = to_f32(from_f32<bf16>((float)(v0 + v1)));"), "{src}");
        assert!(src.contains("((bf16*)p.out)[x] = from_f32<bf16>((float)v3);"));
    }

    /// RoPE's angle region with both casts: the position is read as an integer (double), cast
    /// to float, the product and cosine stay f32, and the cast rounds to bf16.
    fn angles() -> Expr {
        Expr {
            instrs: vec![
                Instr::Input(0),
                Instr::Cast(DType::F32, 0),
                Instr::Input(1),
                Instr::Binary(BinaryOp::Mul, 1, 2),
                Instr::Unary(UnaryOp::Cos, 3),
                Instr::Cast(DType::BF16, 4),
            ],
        }
    }

    #[test]
    fn each_value_is_computed_and_rounded_in_its_own_type() {
        let (_, src) = source(&angles(), &[DType::I64, DType::F32], DType::BF16, None).unwrap();
        assert!(src.contains("const double v0 = trunc((double)((double)((const i64*)p.ins[0])[o0]));"), "{src}");
        assert!(src.contains("const float v1 = (float)(v0);"), "{src}");
        assert!(src.contains("const float v3 = (float)(v1 * v2);"), "{src}");
        assert!(src.contains("const float v4 = (float)(cosf(v3));"), "{src}");
        assert!(src.contains("const float v5 = to_f32(from_f32<bf16>((float)(v4)));"), "{src}");
        // A bf16 head's epilogue after a GEMM writing f32: the product is rounded to bf16 first.
        let softcap = Expr {
            instrs: vec![
                Instr::Input(0),
                Instr::Const(30.0),
                Instr::Binary(BinaryOp::Div, 0, 1),
                Instr::Unary(UnaryOp::Tanh, 2),
                Instr::Binary(BinaryOp::Mul, 3, 1),
                Instr::Cast(DType::F32, 4),
            ],
        };
        let (e, ins) = crate::cuda::gemm::epilogue_region(&softcap, DType::BF16, DType::F32, &[]);
        assert_eq!(e.formula(), "cast[f32](mul(tanh(div(cast[bf16]($0), 30.0)), 30.0))");
        let (_, src) = source(&e, &ins, DType::F32, None).unwrap();
        assert!(src.contains("const float v1 = to_f32(from_f32<bf16>((float)(v0)));"), "{src}");
        assert!(src.contains("const float v3 = to_f32(from_f32<bf16>((float)(v1 / v2)));"), "{src}");
        assert!(src.contains("((float*)p.out)[x] = from_f32<float>((float)v6);"), "{src}");
    }

    #[test]
    fn names_depend_on_code_and_dtypes() {
        let e = gelu_add();
        let a = kernel_name(&e, &[DType::F32, DType::F32], DType::F32);
        assert_eq!(a, kernel_name(&e, &[DType::F32, DType::F32], DType::F32));
        assert_ne!(a, kernel_name(&e, &[DType::BF16, DType::BF16], DType::BF16));
    }

    #[test]
    fn too_many_inputs_is_an_error() {
        let e = Expr { instrs: vec![Instr::Input(0)] };
        let err = source(&e, &[DType::F32; 17], DType::F32, None).unwrap_err();
        assert!(err.contains("at most 16"), "{err}");
    }

    /// The NVRTC check, skipped with a note where libnvrtc is missing, unless
    /// `KILN_REQUIRE_NVRTC=1` (set by scripts/test.sh).
    fn nvrtc_or_skip() -> bool {
        if nvrtc::available() {
            return true;
        }
        let required = std::env::var("KILN_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
        assert!(!required, "KILN_REQUIRE_NVRTC=1 but {}", nvrtc::INSTALL_HINT);
        eprintln!("skipped: {}", nvrtc::INSTALL_HINT);
        false
    }

    /// Programmatic dependent launch: both entries of a generated region (plain, permuted)
    /// wait before any global load or store, and the module defines the marker the runtime
    /// looks for (`kiln_kernels::cuda::pdl`).
    #[test]
    fn generated_regions_wait_before_they_touch_memory() {
        if !nvrtc_or_skip() {
            return;
        }
        use crate::rotation::{Run, SignedPerm};
        let half = SignedPerm { d: 8, runs: vec![Run { dst: 0, len: 4, src: 4, neg: true }, Run { dst: 4, len: 4, src: 0, neg: false }] };
        for perm in [None, Some(&half)] {
            let (name, src) = source(&gelu_add(), &[DType::BF16, DType::BF16], DType::BF16, perm).unwrap();
            let ptx = nvrtc::ptx(&name, &src, "compute_90a").unwrap_or_else(|e| panic!("{e}\n{src}"));
            assert!(ptx.contains(kiln_kernels::cuda::pdl::MARKER), "{name}: no marker");
            let order = kiln_kernels::cuda::pdl::order(&ptx);
            for k in [name.clone(), format!("{name}_x2")] {
                let (_, problems) = order.iter().find(|(n, _)| *n == k).unwrap_or_else(|| panic!("{k}: no entry in\n{ptx}"));
                assert!(problems.is_empty(), "{k}: {problems:?}");
            }
        }
    }

    #[test]
    fn generated_regions_compile_for_every_dtype() {
        if !nvrtc_or_skip() {
            return;
        }
        // RoPE-like: x * cos + rotate * sin; a comparison and a select; a cast to i32.
        let rope = Expr {
            instrs: vec![
                Instr::Input(0),
                Instr::Input(1),
                Instr::Binary(BinaryOp::Mul, 0, 1),
                Instr::Input(2),
                Instr::Input(3),
                Instr::Binary(BinaryOp::Mul, 3, 4),
                Instr::Binary(BinaryOp::Add, 2, 5),
            ],
        };
        let select = Expr {
            instrs: vec![
                Instr::Input(0),
                Instr::Const(0.0),
                Instr::Binary(BinaryOp::Gt, 0, 1),
                Instr::Unary(UnaryOp::GeluTanh, 0),
                Instr::Const(f32::NEG_INFINITY),
                Instr::Select(2, 3, 4),
            ],
        };
        for d in [DType::F32, DType::BF16, DType::F16] {
            for (e, n, out) in [(&rope, 4, d), (&select, 1, d), (&select, 1, DType::Bool)] {
                let (name, src) = source(e, &vec![d; n], out, None).unwrap();
                let c = nvrtc::compile(&name, &src, "sm_90a").unwrap_or_else(|e| panic!("{e}\n{src}"));
                for k in [name.clone(), format!("{name}_x2")] {
                    assert!(c.kernels.iter().any(|(n, r)| *n == k && r.spill_stores == 0 && r.stack == 0), "{k}: {:?}", c.kernels);
                }
            }
        }
        // Regions holding casts: RoPE's angles to bf16 and f16, a bf16 head's epilogue.
        for d in [DType::BF16, DType::F16] {
            let mut e = angles();
            e.instrs[5] = Instr::Cast(d, 4);
            let (name, src) = source(&e, &[DType::I64, DType::F32], d, None).unwrap();
            nvrtc::compile(&name, &src, "sm_90a").unwrap_or_else(|e| panic!("{e}\n{src}"));
        }
        let head = Expr { instrs: vec![Instr::Input(0), Instr::Unary(UnaryOp::Tanh, 0), Instr::Cast(DType::F32, 1)] };
        let (e, ins) = crate::cuda::gemm::epilogue_region(&head, DType::BF16, DType::F32, &[]);
        let (name, src) = source(&e, &ins, DType::F32, None).unwrap();
        nvrtc::compile(&name, &src, "sm_90a").unwrap_or_else(|e| panic!("{e}\n{src}"));
        let ids = Expr { instrs: vec![Instr::Input(0), Instr::Const(1.0), Instr::Binary(BinaryOp::Add, 0, 1)] };
        let (name, src) = source(&ids, &[DType::I64], DType::I32, None).unwrap();
        nvrtc::compile(&name, &src, "sm_90a").unwrap_or_else(|e| panic!("{e}\n{src}"));
    }
}
