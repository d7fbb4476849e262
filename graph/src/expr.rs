//! Fused elementwise expressions: the body of a fused region or of a matmul epilogue, as
//! straight-line SSA. Every instruction's value has its own dtype ([`Expr::dtypes`]: an
//! input's, a cast's target, its operands'), and is rounded to it, so a region computes
//! exactly what its unfused chain of nodes computes on the interpreter, casts included.

use crate::dtype::DType;
use crate::op::{BinaryOp, UnaryOp};
use serde::{Deserialize, Serialize};

/// One instruction of a fused elementwise expression (straight-line SSA; the result is the last).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Instr {
    /// Element of region input `i`, broadcast to the region's shape.
    Input(u16),
    /// A scalar constant; its dtype is that of the value it is first combined with.
    Const(f32),
    Unary(UnaryOp, u16),
    Binary(BinaryOp, u16, u16),
    /// `c != 0 ? a : b`.
    Select(u16, u16, u16),
    /// The operand converted to the dtype (as [`crate::Op::Cast`] does: rounded to it).
    Cast(DType, u16),
}

impl Instr {
    /// The instructions this one reads, in order.
    pub fn operands(&self) -> Vec<u16> {
        match *self {
            Instr::Input(_) | Instr::Const(_) => vec![],
            Instr::Unary(_, a) | Instr::Cast(_, a) => vec![a],
            Instr::Binary(_, a, b) => vec![a, b],
            Instr::Select(c, a, b) => vec![c, a, b],
        }
    }

    /// The instruction with every operand index mapped by `f`.
    pub fn map_operands(self, mut f: impl FnMut(u16) -> u16) -> Instr {
        match self {
            Instr::Input(_) | Instr::Const(_) => self,
            Instr::Unary(op, a) => Instr::Unary(op, f(a)),
            Instr::Cast(d, a) => Instr::Cast(d, f(a)),
            Instr::Binary(op, a, b) => Instr::Binary(op, f(a), f(b)),
            Instr::Select(c, a, b) => Instr::Select(f(c), f(a), f(b)),
        }
    }
}

/// A fused elementwise expression: the body of a fused region or of a matmul epilogue.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
pub struct Expr {
    pub instrs: Vec<Instr>,
}

impl Expr {
    /// Number of distinct inputs the expression reads (one more than the largest index).
    pub fn arity(&self) -> usize {
        self.instrs
            .iter()
            .filter_map(|i| match i {
                Instr::Input(k) => Some(*k as usize + 1),
                Instr::Const(_) | Instr::Unary(..) | Instr::Binary(..) | Instr::Select(..) | Instr::Cast(..) => None,
            })
            .max()
            .unwrap_or(0)
    }

    /// Whether the expression converts between dtypes inside (artifact format version 6).
    pub fn has_cast(&self) -> bool {
        self.instrs.iter().any(|i| matches!(i, Instr::Cast(..)))
    }

    /// The expression as a nested formula over `$i` inputs (what `kiln inspect` prints).
    pub fn formula(&self) -> String {
        let mut parts: Vec<String> = Vec::with_capacity(self.instrs.len());
        for ins in &self.instrs {
            let p = |a: u16| parts.get(a as usize).cloned().unwrap_or_default();
            let s = match *ins {
                Instr::Input(i) => format!("${i}"),
                Instr::Const(c) => format!("{c:?}"),
                Instr::Unary(op, a) => format!("{}({})", format!("{op:?}").to_lowercase(), p(a)),
                Instr::Binary(op, a, b) => format!("{}({}, {})", format!("{op:?}").to_lowercase(), p(a), p(b)),
                Instr::Select(c, a, b) => format!("select({}, {}, {})", p(c), p(a), p(b)),
                Instr::Cast(d, a) => format!("cast[{d}]({})", p(a)),
            };
            parts.push(s);
        }
        parts.pop().unwrap_or_default()
    }

    /// The dtype of every instruction's value, given the inputs' dtypes: an input's own, a
    /// cast's target, a comparison's bool, else its operands' (which must agree, as the
    /// unfused op's shape rule demands). A constant takes the dtype of the value it is first
    /// combined with (the constant node it came from had that type); one combined with none
    /// takes the first float input's (f32 when there is none). Errors name the instruction.
    pub fn dtypes(&self, inputs: &[DType]) -> Result<Vec<DType>, String> {
        let n = self.instrs.len();
        let is_const = |k: u16| matches!(self.instrs.get(k as usize), Some(Instr::Const(_)));
        // Pass 1: what each constant meets first.
        let mut known: Vec<Option<DType>> = vec![None; n];
        for (i, ins) in self.instrs.iter().enumerate() {
            if ins.operands().iter().any(|&a| a as usize >= i) {
                return Err(format!("expression instruction {i} reads a later instruction"));
            }
            let get = |known: &[Option<DType>], k: u16| known[k as usize];
            let meet = |known: &mut [Option<DType>], x: u16, other: Option<DType>| {
                if is_const(x) && known[x as usize].is_none() {
                    known[x as usize] = other;
                }
            };
            known[i] = match *ins {
                Instr::Input(k) => Some(*inputs.get(k as usize).ok_or_else(|| format!("expression reads input {k} of {}", inputs.len()))?),
                Instr::Const(_) => None,
                Instr::Unary(UnaryOp::Not, _) => Some(DType::Bool),
                Instr::Unary(_, a) => get(&known, a),
                Instr::Cast(d, _) => Some(d),
                Instr::Binary(op, a, b) => {
                    let (da, db) = (get(&known, a), get(&known, b));
                    meet(&mut known, a, db);
                    meet(&mut known, b, da);
                    if op.is_comparison() {
                        Some(DType::Bool)
                    } else {
                        da.or(db)
                    }
                }
                Instr::Select(c, a, b) => {
                    let (da, db) = (get(&known, a), get(&known, b));
                    meet(&mut known, c, Some(DType::Bool));
                    meet(&mut known, a, db);
                    meet(&mut known, b, da);
                    da.or(db)
                }
            };
        }
        // Pass 2: every value's dtype, checked.
        let fallback = inputs.iter().copied().find(|d| d.is_float()).unwrap_or(DType::F32);
        let mut out: Vec<DType> = Vec::with_capacity(n);
        for (i, ins) in self.instrs.iter().enumerate() {
            let get = |k: u16| out[k as usize];
            let d = match *ins {
                Instr::Input(k) => inputs[k as usize],
                Instr::Const(_) => known[i].unwrap_or(fallback),
                Instr::Unary(UnaryOp::Not, _) => DType::Bool,
                Instr::Unary(_, a) => get(a),
                Instr::Cast(d, _) => d,
                Instr::Binary(op, a, b) => {
                    if get(a) != get(b) {
                        return Err(format!("expression instruction {i} ({op:?}): operand dtypes differ: {} vs {}", get(a), get(b)));
                    }
                    if op.is_comparison() {
                        DType::Bool
                    } else {
                        get(a)
                    }
                }
                Instr::Select(c, a, b) => {
                    if get(c) != DType::Bool {
                        return Err(format!("expression instruction {i} (select): condition must be bool, got {}", get(c)));
                    }
                    if get(a) != get(b) {
                        return Err(format!("expression instruction {i} (select): branch dtypes differ: {} vs {}", get(a), get(b)));
                    }
                    get(a)
                }
            };
            out.push(d);
        }
        Ok(out)
    }

    /// The dtype a fused region (or matmul epilogue) computes from inputs of `inputs`, checked:
    /// the result is float, and an integer value is read only by casts (an integer input
    /// converted to float, such as positions), since regions compute floats.
    pub fn region_dtype(&self, inputs: &[DType]) -> Result<DType, String> {
        let d = self.dtypes(inputs)?;
        let last = *d.last().ok_or("empty fused expression")?;
        if !last.is_float() {
            return Err(format!("a fused region computes floats, this one gives {last}"));
        }
        for (i, ins) in self.instrs.iter().enumerate() {
            if matches!(ins, Instr::Cast(..)) {
                continue;
            }
            if let Some(&a) = ins.operands().iter().find(|&&a| !d[a as usize].is_float() && d[a as usize] != DType::Bool) {
                return Err(format!("expression instruction {i} reads the {} value {a}: only a cast may read an integer", d[a as usize]));
            }
        }
        Ok(last)
    }

    /// Evaluates the expression on scalars (`inputs[i]` is the value of `Input(i)`), rounding
    /// every value to its dtype (`dtypes`, from [`Expr::dtypes`]): a region computes what its
    /// unfused ops would, each storing its result in its own type (so `x >= y` of two equal
    /// roundings stays true, and a cast rounds where the cast node did).
    pub fn eval(&self, inputs: &[f64], scratch: &mut Vec<f64>, dtypes: &[DType]) -> f64 {
        scratch.clear();
        for (ins, d) in self.instrs.iter().zip(dtypes) {
            let v = match *ins {
                Instr::Input(i) => inputs[i as usize],
                Instr::Const(c) => c as f64,
                Instr::Unary(op, a) => crate::scalar::unary(op, scratch[a as usize]),
                Instr::Binary(op, a, b) => crate::scalar::binary(op, scratch[a as usize], scratch[b as usize]),
                Instr::Select(c, a, b) => {
                    if scratch[c as usize] != 0.0 {
                        scratch[a as usize]
                    } else {
                        scratch[b as usize]
                    }
                }
                Instr::Cast(_, a) => scratch[a as usize],
            };
            scratch.push(d.round(v));
        }
        scratch.last().copied().unwrap_or(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(instrs: Vec<Instr>) -> Expr {
        Expr { instrs }
    }

    #[test]
    fn each_value_has_its_own_dtype() {
        // positions (i64) -> f32, times a constant, cos, to bf16.
        let x = e(vec![
            Instr::Input(0),
            Instr::Cast(DType::F32, 0),
            Instr::Const(0.1),
            Instr::Binary(BinaryOp::Mul, 1, 2),
            Instr::Unary(UnaryOp::Cos, 3),
            Instr::Cast(DType::BF16, 4),
        ]);
        let d = x.dtypes(&[DType::I64]).unwrap();
        assert_eq!(d, [DType::I64, DType::F32, DType::F32, DType::F32, DType::F32, DType::BF16]);
        assert_eq!(x.region_dtype(&[DType::I64]).unwrap(), DType::BF16);
        assert_eq!(x.formula(), "cast[bf16](cos(mul(cast[f32]($0), 0.1)))");
        let mut s = Vec::new();
        let got = x.eval(&[3.0], &mut s, &d);
        let want = DType::BF16.round(DType::F32.round(DType::F32.round(3.0 * DType::F32.round(0.1f32 as f64)).cos()));
        assert_eq!(got, want);
        // The angle stays f32 (not rounded to the result's bf16).
        assert_ne!(s[3], DType::BF16.round(s[3]));
    }

    /// The oracle's rounding to bf16 and f16 is correct: an f32 value rounds as the f32
    /// conversions (and the GPUs) round it, including one just above a tie, which `half`'s
    /// `from_f64` rounds down; and a value between two f32s is not taken for a tie.
    #[test]
    fn rounding_to_half_types_is_correct() {
        let a = 0.00013399125600699335f64;
        assert_eq!(DType::BF16.round(a), 0.00013446807861328125);
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = f32::from_bits((x >> 32) as u32);
            if !v.is_finite() {
                continue;
            }
            assert_eq!(DType::BF16.round(v as f64).to_bits(), (half::bf16::from_f32(v).to_f32() as f64).to_bits(), "{v:e}");
            assert_eq!(DType::F16.round(v as f64).to_bits(), (half::f16::from_f32(v).to_f32() as f64).to_bits(), "{v:e}");
        }
        // 1 + 2^-8 is a bf16 tie (to 1.0); a hair above it is not.
        assert_eq!(DType::BF16.round(1.0 + 2f64.powi(-8)), 1.0);
        assert_eq!(DType::BF16.round(1.0 + 2f64.powi(-8) + 2f64.powi(-40)), 1.0 + 2f64.powi(-7));
    }

    #[test]
    fn constants_take_their_partners_dtype() {
        let x = e(vec![Instr::Input(0), Instr::Const(1.0), Instr::Binary(BinaryOp::Add, 1, 0), Instr::Cast(DType::F32, 2)]);
        assert_eq!(x.dtypes(&[DType::BF16]).unwrap(), [DType::BF16, DType::BF16, DType::BF16, DType::F32]);
    }

    #[test]
    fn integers_are_read_only_by_casts() {
        let x = e(vec![Instr::Input(0), Instr::Input(1), Instr::Binary(BinaryOp::Add, 0, 1), Instr::Cast(DType::F32, 2)]);
        assert!(x.region_dtype(&[DType::I64, DType::I64]).unwrap_err().contains("only a cast"));
        let mixed = e(vec![Instr::Input(0), Instr::Input(1), Instr::Binary(BinaryOp::Mul, 0, 1)]);
        assert!(mixed.dtypes(&[DType::F32, DType::BF16]).unwrap_err().contains("operand dtypes differ"));
        let ends_int = e(vec![Instr::Input(0), Instr::Cast(DType::I32, 0)]);
        assert!(ends_int.region_dtype(&[DType::F32]).unwrap_err().contains("computes floats"));
    }
}
