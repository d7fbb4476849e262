//! Fused elementwise regions and matmul epilogues on the CPU: one pass over memory, the
//! expression evaluated on blocks of a row held in stack buffers, so the loops vectorise and
//! no intermediate tensor is written.

use kiln_graph::dtype::broadcast_strides;
use kiln_graph::{BinaryOp, DType, Expr, Instr, UnaryOp};
use kiln_kernels::cpu::elementwise as ew;
use rayon::prelude::*;

/// Elements of a row evaluated at once.
const BLOCK: usize = 64;
/// Largest expression a region may hold (the fusion pass stays well under it).
pub const MAX_INSTRS: usize = 96;
/// Most inputs a region may read.
pub const MAX_INPUTS: usize = 16;

/// How one region input is read: per row, a base offset; within a row, stride 0 or 1.
#[derive(Clone, Debug)]
pub struct InputLayout {
    /// Broadcast strides over the output's outer (all but last) axes.
    outer: Vec<usize>,
    /// 1 when the input varies along the last axis, 0 when broadcast along it.
    inner: usize,
}

/// One region input as stored: f32 (read in blocks), or an integer or bool tensor's bytes
/// (converted to f32 as read; the expression reads it only through a cast).
#[derive(Clone, Copy, Debug)]
pub enum Src<'a> {
    F32(&'a [f32]),
    Raw(&'a [u8], DType),
}

impl Src<'_> {
    /// Element `i` as f32: an integer through f64, as the interpreter holds it.
    fn at(&self, i: usize) -> f32 {
        match *self {
            Src::F32(v) => v[i],
            Src::Raw(b, d) => {
                let n = d.size();
                let e = &b[i * n..(i + 1) * n];
                let v = match d {
                    DType::I64 => i64::from_le_bytes(e.try_into().unwrap_or([0; 8])) as f64,
                    DType::I32 => i32::from_le_bytes(e.try_into().unwrap_or([0; 4])) as f64,
                    DType::U8 | DType::Bool => e[0] as f64,
                    DType::F32 => f32::from_le_bytes(e.try_into().unwrap_or([0; 4])) as f64,
                    DType::BF16 => half::bf16::from_le_bytes(e.try_into().unwrap_or([0; 2])).to_f64(),
                    DType::F16 => half::f16::from_le_bytes(e.try_into().unwrap_or([0; 2])).to_f64(),
                };
                v as f32
            }
        }
    }
}

/// How a value computed in f32 is rounded to its own dtype, where that differs from f32.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Rounding {
    None,
    To(DType),
}

/// A region prepared for one output shape.
#[derive(Clone, Debug)]
pub struct Region {
    pub expr: Expr,
    pub inputs: Vec<InputLayout>,
    /// Per instruction: rounding after it is computed (a bf16 value, a cast's target).
    rounding: Vec<Rounding>,
    outer_shape: Vec<usize>,
    pub row_len: usize,
}

impl Region {
    /// Prepares `expr` over inputs of `in_types` (shape, dtype) broadcast to `out_shape`. Every
    /// value is computed in f32 and rounded to its own dtype (bf16, f16: exact for the
    /// arithmetic, f32 being more than twice as precise), so a region holding casts gives the
    /// interpreter's values.
    pub fn new(expr: Expr, in_types: &[(&[usize], DType)], out_shape: &[usize]) -> Result<Self, String> {
        if expr.instrs.len() > MAX_INSTRS || in_types.len() > MAX_INPUTS {
            return Err(format!(
                "fused region of {} instructions and {} inputs exceeds {MAX_INSTRS}/{MAX_INPUTS}",
                expr.instrs.len(),
                in_types.len()
            ));
        }
        let dtypes = expr.dtypes(&in_types.iter().map(|t| t.1).collect::<Vec<_>>())?;
        let rounding = expr
            .instrs
            .iter()
            .zip(&dtypes)
            .map(|(ins, &d)| match (ins, d) {
                // Integers are read exactly below 2^24 (positions, ids); bools are 0 / 1.
                (Instr::Input(_), _) | (_, DType::F32) => Rounding::None,
                (Instr::Cast(..), _) => Rounding::To(d),
                (_, DType::Bool) => Rounding::None,
                _ => Rounding::To(d),
            })
            .collect();
        let in_shapes: Vec<&[usize]> = in_types.iter().map(|t| t.0).collect();
        let (outer_shape, row_len) = match out_shape.split_last() {
            Some((&last, outer)) => (outer.to_vec(), last),
            None => (vec![], 1),
        };
        let inputs = in_shapes
            .iter()
            .map(|s| {
                let st = broadcast_strides(s, out_shape);
                let (inner, outer) = match st.split_last() {
                    Some((&i, o)) => (i, o.to_vec()),
                    None => (0, vec![]),
                };
                InputLayout { outer, inner }
            })
            .collect();
        Ok(Region { expr, inputs, rounding, outer_shape, row_len })
    }

    fn row_base(&self, input: usize, mut row: usize) -> usize {
        let l = &self.inputs[input];
        let mut off = 0;
        for d in (0..self.outer_shape.len()).rev() {
            let n = self.outer_shape[d];
            off += (row % n) * l.outer[d];
            row /= n;
        }
        off
    }

    /// Evaluates rows `first_row..` into `out` (whole rows). With `in_place`, input 0 is
    /// `out` itself (a matmul epilogue reading the product).
    pub fn eval_rows(&self, ins: &[Src], out: &mut [f32], first_row: usize, in_place: bool) {
        let n = self.row_len.max(1);
        let mut regs = [[0f32; BLOCK]; MAX_INSTRS];
        for (r, row) in out.chunks_mut(n).enumerate() {
            let gr = first_row + r;
            let mut c0 = 0;
            while c0 < row.len() {
                let len = BLOCK.min(row.len() - c0);
                let cur: &[f32] = row;
                let last = self.block(&mut regs, len, &|k, dst| {
                    if in_place && k == 0 {
                        dst.copy_from_slice(&cur[c0..c0 + len]);
                    } else {
                        self.load(ins[k - usize::from(in_place)], k, gr, c0, dst);
                    }
                });
                row[c0..c0 + len].copy_from_slice(&regs[last][..len]);
                c0 += len;
            }
        }
    }

    /// Evaluates a gated matmul's epilogue over columns `col0..col0 + out.len()` of row `row`:
    /// input 0 reads `gate` (those columns of the first product), input 1 reads `out` itself
    /// (the second product's), input `k >= 2` reads `extra[k - 2]`.
    pub fn eval_gated(&self, extra: &[Src], gate: &[f32], out: &mut [f32], row: usize, col0: usize) {
        let mut regs = [[0f32; BLOCK]; MAX_INSTRS];
        let mut c0 = 0;
        while c0 < out.len() {
            let len = BLOCK.min(out.len() - c0);
            let cur: &[f32] = out;
            let last = self.block(&mut regs, len, &|k, dst| match k {
                0 => dst.copy_from_slice(&gate[c0..c0 + len]),
                1 => dst.copy_from_slice(&cur[c0..c0 + len]),
                _ => self.load(extra[k - 2], k, row, col0 + c0, dst),
            });
            out[c0..c0 + len].copy_from_slice(&regs[last][..len]);
            c0 += len;
        }
    }

    /// Input `k` (read from `src`) at row `row`, columns `c0..c0 + dst.len()`.
    fn load(&self, src: Src, k: usize, row: usize, c0: usize, dst: &mut [f32]) {
        let (base, len) = (self.row_base(k, row), dst.len());
        match (src, self.inputs[k].inner == 1) {
            (Src::F32(v), true) => dst.copy_from_slice(&v[base + c0..base + c0 + len]),
            (src, true) => dst.iter_mut().enumerate().for_each(|(j, d)| *d = src.at(base + c0 + j)),
            (src, false) => dst.fill(src.at(base)),
        }
    }

    /// Runs the instructions over `len` elements, each input given by `input(k, dst)`; the
    /// index of the register holding the result.
    fn block(&self, regs: &mut [[f32; BLOCK]; MAX_INSTRS], len: usize, input: &dyn Fn(usize, &mut [f32])) -> usize {
        for (i, ins_) in self.expr.instrs.iter().enumerate() {
            let (done, rest) = regs.split_at_mut(i);
            let dst = &mut rest[0][..len];
            match *ins_ {
                Instr::Input(k) => input(k as usize, dst),
                Instr::Const(c) => dst.fill(c),
                Instr::Cast(_, a) => dst.copy_from_slice(&done[a as usize][..len]),
                Instr::Unary(op, a) => unary(op, &done[a as usize][..len], dst),
                Instr::Binary(op, a, b) => binary(op, &done[a as usize][..len], &done[b as usize][..len], dst),
                Instr::Select(c, a, b) => {
                    let (c, a, b) = (&done[c as usize], &done[a as usize], &done[b as usize]);
                    for j in 0..len {
                        dst[j] = if c[j] != 0.0 { a[j] } else { b[j] };
                    }
                }
            }
            if let Rounding::To(d) = self.rounding[i] {
                round(d, dst);
            }
        }
        self.expr.instrs.len() - 1
    }

    /// Evaluates the whole output in parallel over row chunks.
    pub fn eval(&self, ins: &[Src], out: &mut [f32]) {
        self.eval_par(ins, out, false);
    }

    /// Evaluates an epilogue over a whole product held in `out`, in parallel.
    pub fn eval_in_place(&self, extra: &[Src], out: &mut [f32]) {
        self.eval_par(extra, out, true);
    }

    fn eval_par(&self, ins: &[Src], out: &mut [f32], in_place: bool) {
        let n = self.row_len.max(1);
        let rows = out.len() / n;
        let per = (8192 / n).max(1).max(rows.div_ceil(4 * rayon::current_num_threads()));
        out.par_chunks_mut(per * n).enumerate().for_each(|(i, chunk)| self.eval_rows(ins, chunk, i * per, in_place));
    }
}

/// Rounds f32 values to a narrower dtype (bf16, f16; an integer or bool cast's target), in place.
fn round(d: DType, v: &mut [f32]) {
    match d {
        DType::BF16 => v.iter_mut().for_each(|x| *x = half::bf16::from_f32(*x).to_f32()),
        DType::F16 => v.iter_mut().for_each(|x| *x = half::f16::from_f32(*x).to_f32()),
        DType::F32 => {}
        DType::I64 | DType::I32 | DType::U8 | DType::Bool => v.iter_mut().for_each(|x| *x = d.round(*x as f64) as f32),
    }
}

fn unary(op: UnaryOp, a: &[f32], d: &mut [f32]) {
    macro_rules! map {
        ($f:expr) => {
            for (d, &x) in d.iter_mut().zip(a) {
                *d = $f(x);
            }
        };
    }
    match op {
        UnaryOp::Neg => map!(|x: f32| -x),
        UnaryOp::Abs => map!(f32::abs),
        UnaryOp::Exp => map!(ew::exp),
        UnaryOp::Log => map!(f32::ln),
        UnaryOp::Sqrt => map!(f32::sqrt),
        UnaryOp::Rsqrt => map!(|x: f32| 1.0 / x.sqrt()),
        UnaryOp::Recip => map!(|x: f32| 1.0 / x),
        UnaryOp::Square => map!(|x: f32| x * x),
        UnaryOp::Tanh => map!(ew::tanh),
        UnaryOp::Sigmoid => map!(ew::sigmoid),
        UnaryOp::Erf => map!(ew::erf),
        UnaryOp::Sin => map!(f32::sin),
        UnaryOp::Cos => map!(f32::cos),
        UnaryOp::Floor => map!(f32::floor),
        UnaryOp::Relu => map!(ew::relu),
        UnaryOp::GeluTanh => map!(ew::gelu_tanh),
        UnaryOp::GeluErf => map!(ew::gelu_erf),
        UnaryOp::Silu => map!(ew::silu),
        UnaryOp::Softplus => map!(|x: f32| if x > 20.0 { x } else { x.exp().ln_1p() }),
        UnaryOp::Not => map!(|x: f32| if x == 0.0 { 1.0 } else { 0.0 }),
    }
}

fn flag(b: bool) -> f32 {
    if b {
        1.0
    } else {
        0.0
    }
}

fn binary(op: BinaryOp, a: &[f32], b: &[f32], d: &mut [f32]) {
    macro_rules! zip {
        ($f:expr) => {
            for ((d, &x), &y) in d.iter_mut().zip(a).zip(b) {
                *d = $f(x, y);
            }
        };
    }
    match op {
        BinaryOp::Add => zip!(|x, y| x + y),
        BinaryOp::Sub => zip!(|x, y| x - y),
        BinaryOp::Mul => zip!(|x, y| x * y),
        BinaryOp::Div => zip!(|x, y| x / y),
        BinaryOp::Max => zip!(f32::max),
        BinaryOp::Min => zip!(f32::min),
        BinaryOp::Pow => zip!(f32::powf),
        BinaryOp::Eq => zip!(|x, y| flag(x == y)),
        BinaryOp::Ne => zip!(|x, y| flag(x != y)),
        BinaryOp::Lt => zip!(|x, y| flag(x < y)),
        BinaryOp::Le => zip!(|x, y| flag(x <= y)),
        BinaryOp::Gt => zip!(|x, y| flag(x > y)),
        BinaryOp::Ge => zip!(|x, y| flag(x >= y)),
        BinaryOp::And => zip!(|x: f32, y: f32| flag(x != 0.0 && y != 0.0)),
        BinaryOp::Or => zip!(|x: f32, y: f32| flag(x != 0.0 || y != 0.0)),
    }
}
