//! Fused elementwise regions as CUDA C: one kernel per distinct region (expression and
//! dtypes), straight-line code, computed in f32 (f64 for integer regions) with every
//! intermediate rounded to the region's dtype, as the interpreter does
//! ([`kiln_graph::Expr::eval`]).

use super::{DevPtr, MAX_RANK};
use kiln_graph::{BinaryOp, DType, Expr, Instr, UnaryOp};
use std::fmt::Write;

/// Most inputs a fused region may read.
pub const MAX_INPUTS: usize = 16;

/// How a kernel reads one input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum Access {
    /// Same shape as the output, contiguous: element `x` for output element `x`.
    Contiguous = 0,
    /// One element, broadcast.
    Scalar = 1,
    /// Broadcast or strided: offsets from the output index and the input's strides.
    Strided = 2,
}

/// Parameters of every fused kernel (`FusedParams` in the generated source).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FusedParams {
    pub out: DevPtr,
    pub ins: [DevPtr; MAX_INPUTS],
    pub n: i64,
    pub rank: i32,
    /// 1 when some input is [`Access::Strided`] (the kernel then decomposes the index).
    pub strided: i32,
    pub dims: [i64; MAX_RANK],
    pub access: [i32; MAX_INPUTS],
    pub st: [[i64; MAX_RANK]; MAX_INPUTS],
}

impl Default for FusedParams {
    fn default() -> Self {
        FusedParams {
            out: 0,
            ins: [0; MAX_INPUTS],
            n: 0,
            rank: 0,
            strided: 0,
            dims: [0; MAX_RANK],
            access: [0; MAX_INPUTS],
            st: [[0; MAX_RANK]; MAX_INPUTS],
        }
    }
}

const PARAMS_C: &str = r#"
struct FusedParams {
  i64 out;
  i64 ins[16];
  i64 n;
  int rank, strided;
  i64 dims[8];
  int access[16];
  i64 st[16][8];
};
"#;

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

/// The dtype every intermediate of a region is rounded to: the output's, or for a region
/// producing booleans, its first input's.
pub fn region_dtype(inputs: &[DType], out: DType) -> DType {
    if out == DType::Bool {
        inputs.first().copied().unwrap_or(DType::F32)
    } else {
        out
    }
}

/// Stable kernel name of a region: FNV-1a of its instructions and dtypes.
pub fn kernel_name(expr: &Expr, inputs: &[DType], out: DType) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    let text = format!("{:?}|{:?}|{:?}", expr.instrs, inputs, out);
    for b in text.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("fused_{h:016x}")
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

/// Rounds a compute value to the region dtype (the interpreter's per-instruction rounding).
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
/// what the generator does not support.
pub fn source(expr: &Expr, inputs: &[DType], out: DType) -> Result<(String, String), String> {
    if inputs.len() > MAX_INPUTS {
        return Err(format!("a fused region of {} inputs (the CUDA generator takes at most {MAX_INPUTS})", inputs.len()));
    }
    if expr.instrs.is_empty() {
        return Err("an empty fused region".into());
    }
    if expr.arity() > inputs.len() {
        return Err(format!("the region reads input {} but the step has {}", expr.arity() - 1, inputs.len()));
    }
    let name = kernel_name(expr, inputs, out);
    let rd = region_dtype(inputs, out);
    let f = rd.is_float();
    let ct = if f { "float" } else { "double" };
    let mut s = String::new();
    s.push_str(super::COMMON);
    s.push_str(PARAMS_C);
    let _ = writeln!(s, "extern \"C\" __global__ void __launch_bounds__(256) {name}(const FusedParams p) {{");
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
    for (v, ins) in expr.instrs.iter().enumerate() {
        let rhs = match *ins {
            Instr::Input(k) => {
                let d = inputs[k as usize];
                let load = format!("((const {}*)p.ins[{k}])[o{k}]", c_type(d));
                if d.is_float() {
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
        };
        let _ = writeln!(s, "    const {ct} v{v} = {};", round(rd, &format!("({ct})({rhs})")));
    }
    let last = expr.instrs.len() - 1;
    let store = match out {
        DType::F32 | DType::BF16 | DType::F16 => format!("from_f32<{}>((float)v{last})", c_type(out)),
        DType::Bool => format!("(u8)(v{last} != 0 ? 1 : 0)"),
        DType::I32 | DType::I64 | DType::U8 => format!("({})(i64)v{last}", c_type(out)),
    };
    let _ = writeln!(s, "    (({}*)p.out)[x] = {store};", c_type(out));
    let _ = writeln!(s, "  }}\n}}");
    Ok((name, s))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gelu_add() -> Expr {
        Expr { instrs: vec![Instr::Input(0), Instr::Input(1), Instr::Binary(BinaryOp::Add, 0, 1), Instr::Unary(UnaryOp::GeluTanh, 2)] }
    }

    #[test]
    fn a_region_becomes_straight_line_code() {
        let (name, src) = source(&gelu_add(), &[DType::BF16, DType::BF16], DType::BF16).unwrap();
        assert!(name.starts_with("fused_"));
        assert!(src.contains(&format!("void __launch_bounds__(256) {name}(const FusedParams p)")));
        assert!(src.contains("const float v2 = to_f32(from_f32<bf16>((float)(v0 + v1)));"), "{src}");
        assert!(src.contains("((bf16*)p.out)[x] = from_f32<bf16>((float)v3);"));
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
        let err = source(&e, &[DType::F32; 17], DType::F32).unwrap_err();
        assert!(err.contains("at most 16"), "{err}");
    }

    #[test]
    fn params_match_the_c_struct() {
        assert_eq!(std::mem::size_of::<FusedParams>(), 8 + 16 * 8 + 8 + 8 + 8 * 8 + 16 * 4 + 16 * 8 * 8);
    }
}
