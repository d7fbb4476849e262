//! Shape and dtype rules: one arm per op. The builder and the verifier both use them.

use crate::dtype::{broadcast_shapes, DType, TensorType};
use crate::op::{Expr, Instr, MaskKind, Op};

type R = Result<TensorType, String>;

fn arity(inputs: &[&TensorType], n: usize) -> Result<(), String> {
    if inputs.len() != n {
        return Err(format!("expects {n} inputs, got {}", inputs.len()));
    }
    Ok(())
}

fn axis_ok(axis: usize, rank: usize) -> Result<(), String> {
    if axis >= rank {
        return Err(format!("axis {axis} out of range for rank {rank}"));
    }
    Ok(())
}

fn float(t: &TensorType, what: &str) -> Result<(), String> {
    if !t.dtype.is_float() {
        return Err(format!("{what} must be a float tensor, got {t}"));
    }
    Ok(())
}

fn integer(t: &TensorType, what: &str) -> Result<(), String> {
    if !matches!(t.dtype, DType::I32 | DType::I64) {
        return Err(format!("{what} must be i32 or i64, got {t}"));
    }
    Ok(())
}

fn bcast(a: &[usize], b: &[usize]) -> Result<Vec<usize>, String> {
    broadcast_shapes(a, b).ok_or_else(|| format!("shapes {a:?} and {b:?} do not broadcast"))
}

/// Checks a fused expression: inputs exist and broadcast to `out`, indices are in order, and
/// the values' dtypes agree ([`Expr::region_dtype`]); the dtype the expression computes.
fn check_expr(e: &Expr, inputs: &[&TensorType], out: &[usize]) -> Result<DType, String> {
    if e.instrs.is_empty() {
        return Err("empty fused expression".into());
    }
    for ins in &e.instrs {
        if let Instr::Input(k) = *ins {
            let t = inputs.get(k as usize).ok_or_else(|| format!("expression reads input {k} of {}", inputs.len()))?;
            if bcast(&t.shape, out)? != out {
                return Err(format!("expression input {k} {t} does not broadcast to {out:?}"));
            }
        }
    }
    let dtypes: Vec<DType> = inputs.iter().map(|t| t.dtype).collect();
    e.region_dtype(&dtypes)
}

/// A product's two operands (`Op::MatMul`, `Op::GatedMatMul`): at least two inputs, a float
/// `a`, and `b` of `a`'s dtype.
fn matmul_operands<'a>(inputs: &[&'a TensorType]) -> std::result::Result<(&'a TensorType, &'a TensorType), String> {
    if inputs.len() < 2 {
        return Err(format!("expects at least 2 inputs, got {}", inputs.len()));
    }
    let (a, b) = (inputs[0], inputs[1]);
    float(a, "a")?;
    if a.dtype != b.dtype {
        return Err(format!("operand dtypes differ: {a} vs {b}"));
    }
    Ok((a, b))
}

/// [`Op::GatedMatMul`]: `a [.., M, K]` against two stacked weights `b [2, K, N]` (or `[2, N, K]`
/// transposed) of `a`'s dtype; the epilogue reads both `[.., M, N]` products and the inputs
/// after `b`.
fn gated_matmul(transpose_b: bool, e: &Expr, inputs: &[&TensorType]) -> R {
    let (a, b) = matmul_operands(inputs)?;
    if a.rank() < 2 || b.rank() != 3 || b.shape[0] != 2 {
        return Err(format!("expects a of rank >= 2 and two stacked weights [2, K, N]: {a} x {b}"));
    }
    let k = a.shape[a.rank() - 1];
    let (kb, n) = if transpose_b { (b.shape[2], b.shape[1]) } else { (b.shape[1], b.shape[2]) };
    if k != kb {
        return Err(format!("contraction sizes differ: {a} x {b} (transpose_b={transpose_b})"));
    }
    let mut shape = a.shape[..a.rank() - 1].to_vec();
    shape.push(n);
    let product = TensorType::new(a.dtype, shape);
    let mut ins = vec![&product, &product];
    ins.extend(inputs[2..].iter().copied());
    let dtype = check_expr(e, &ins, &product.shape)?;
    if e.arity() != ins.len() {
        return Err(format!("epilogue reads {} inputs, node gives {}", e.arity(), ins.len()));
    }
    Ok(TensorType::new(dtype, product.shape))
}

/// The type of `op` applied to `inputs`. Sources take their type from `given`. Every op is
/// listed here (a new op is a compile error until it is), then checked by its group's rule.
pub fn infer(op: &Op, inputs: &[&TensorType], given: Option<&TensorType>) -> R {
    match op {
        Op::Input { .. } | Op::Weight { .. } | Op::Constant { .. } | Op::Iota { .. } => sources(op, inputs, given),
        Op::Unary(_) | Op::Binary(_) | Op::Select | Op::Cast { .. } | Op::Fused(_) => elementwise(op, inputs),
        Op::Reshape { .. } | Op::Permute { .. } | Op::Slice { .. } | Op::Concat { .. } | Op::WriteSlice { .. } | Op::Broadcast { .. } => {
            movement(op, inputs)
        }
        Op::Gather { .. } | Op::TakeAlongAxis { .. } | Op::ScatterAdd { .. } | Op::TopK { .. } | Op::CumSum { .. } | Op::Resize { .. } => {
            indexing(op, inputs)
        }
        Op::Reduce { .. } | Op::MatMul { .. } | Op::Softmax { .. } | Op::LayerNorm { .. } | Op::RmsNorm { .. } => compute(op, inputs),
        Op::Attention(_) | Op::MoeDispatch { .. } | Op::MoeCombine => compute(op, inputs),
        Op::ResidualRmsNorm(r) => residual_rms_norm(r, inputs),
        Op::Conv(c) => conv(c, inputs),
        Op::SampleToken => sample_token(inputs),
        Op::LogSoftmax => {
            arity(inputs, 1)?;
            float(inputs[0], "input")?;
            if inputs[0].rank() == 0 {
                return Err(format!("log_softmax of a scalar {}: expected at least one axis", inputs[0]));
            }
            Ok(inputs[0].clone())
        }
        Op::TokenLogProb => {
            arity(inputs, 2)?;
            let (x, ids) = (inputs[0], inputs[1]);
            float(x, "logits")?;
            integer(ids, "ids")?;
            let rows_ok = matches!(ids.shape[..], [r] | [r, 1] if x.rank() == 2 && r == x.shape[0] && x.shape[1] > 0);
            if !rows_ok {
                return Err(format!("token_log_prob of logits {x} at ids {ids}: expected logits [R, V] and ids [R] or [R, 1]"));
            }
            Ok(TensorType::new(DType::F32, ids.shape.clone()))
        }
        Op::GatedMatMul { transpose_b, epilogue } => gated_matmul(*transpose_b, epilogue, inputs),
        Op::GatherScaled { axis, .. } => {
            let t = indexing(&Op::Gather { axis: *axis }, inputs)?;
            float(&t, "table")?;
            Ok(t)
        }
    }
}

/// `x [B, H, W, Ci]` (float) and `w [KH, KW, Ci, Co]` of the same dtype give `[B, OH, OW, Co]`.
fn conv(c: &crate::op::Conv, inputs: &[&TensorType]) -> R {
    arity(inputs, 2)?;
    let (x, w) = (inputs[0], inputs[1]);
    float(x, "image")?;
    if x.rank() != 4 || w.rank() != 4 || x.dtype != w.dtype || x.shape[3] != w.shape[2] {
        return Err(format!("conv needs x [B, H, W, Ci] and w [KH, KW, Ci, Co] of one dtype, got {x} and {w}"));
    }
    let [oh, ow] = c.out_hw([x.shape[1], x.shape[2]], [w.shape[0], w.shape[1]])?;
    Ok(TensorType::new(x.dtype, [x.shape[0], oh, ow, w.shape[3]]))
}

/// Inputs, weights, constants and iota: the given type, checked.
fn sources(op: &Op, inputs: &[&TensorType], given: Option<&TensorType>) -> R {
    match op {
        Op::Input { .. } | Op::Weight { .. } => {
            arity(inputs, 0)?;
            given.cloned().ok_or_else(|| "a source needs a type".to_string())
        }
        Op::Constant { values } => {
            arity(inputs, 0)?;
            let t = given.ok_or_else(|| "a constant needs a type".to_string())?;
            if values.len() != t.numel() {
                return Err(format!("constant has {} values for {t}", values.len()));
            }
            Ok(t.clone())
        }
        Op::Iota { axis, .. } => {
            arity(inputs, 0)?;
            let t = given.ok_or_else(|| "iota needs a type".to_string())?;
            axis_ok(*axis, t.rank())?;
            Ok(t.clone())
        }
        _ => unreachable!("{} is not dispatched to sources", op.name()),
    }
}

/// Elementwise ops and fused regions: broadcast shapes, dtype rules.
fn elementwise(op: &Op, inputs: &[&TensorType]) -> R {
    match op {
        Op::Unary(u) => {
            arity(inputs, 1)?;
            let t = inputs[0];
            match u {
                crate::op::UnaryOp::Not => {
                    if t.dtype != DType::Bool {
                        return Err(format!("not needs bool, got {t}"));
                    }
                }
                crate::op::UnaryOp::Neg | crate::op::UnaryOp::Abs => {}
                _ => float(t, "operand")?,
            }
            Ok(t.clone())
        }
        Op::Binary(b) => {
            arity(inputs, 2)?;
            let (a, c) = (inputs[0], inputs[1]);
            if a.dtype != c.dtype {
                return Err(format!("operand dtypes differ: {a} vs {c}"));
            }
            let shape = bcast(&a.shape, &c.shape)?;
            let dtype = if b.is_comparison() { DType::Bool } else { a.dtype };
            Ok(TensorType::new(dtype, shape))
        }
        Op::Select => {
            arity(inputs, 3)?;
            let (c, a, b) = (inputs[0], inputs[1], inputs[2]);
            if c.dtype != DType::Bool {
                return Err(format!("condition must be bool, got {c}"));
            }
            if a.dtype != b.dtype {
                return Err(format!("branch dtypes differ: {a} vs {b}"));
            }
            let s = bcast(&bcast(&c.shape, &a.shape)?, &b.shape)?;
            Ok(TensorType::new(a.dtype, s))
        }
        Op::Cast { to } => {
            arity(inputs, 1)?;
            Ok(TensorType::new(*to, inputs[0].shape.clone()))
        }
        Op::Fused(e) => {
            let first = inputs.first().ok_or("a fused region needs inputs")?;
            let mut shape = first.shape.clone();
            for t in inputs {
                shape = bcast(&shape, &t.shape)?;
            }
            // Regions compute floats; bool masks may flow inside them but not out, and integer
            // inputs only through casts.
            let dtype = check_expr(e, inputs, &shape)?;
            if e.arity() != inputs.len() {
                return Err(format!("expression reads {} inputs, node gives {}", e.arity(), inputs.len()));
            }
            Ok(TensorType::new(dtype, shape))
        }
        _ => unreachable!("{} is not dispatched to elementwise", op.name()),
    }
}

/// Reshape, permute, slice, concat, write-slice, broadcast.
fn movement(op: &Op, inputs: &[&TensorType]) -> R {
    match op {
        Op::Reshape { shape } => {
            arity(inputs, 1)?;
            let t = inputs[0];
            if shape.iter().product::<usize>() != t.numel() {
                return Err(format!("cannot reshape {t} to {shape:?}"));
            }
            Ok(TensorType::new(t.dtype, shape.clone()))
        }
        Op::Permute { perm } => {
            arity(inputs, 1)?;
            let t = inputs[0];
            let mut seen = vec![false; t.rank()];
            if perm.len() != t.rank() {
                return Err(format!("permutation {perm:?} for rank {}", t.rank()));
            }
            for &p in perm {
                if p >= t.rank() || seen[p] {
                    return Err(format!("{perm:?} is not a permutation"));
                }
                seen[p] = true;
            }
            Ok(TensorType::new(t.dtype, perm.iter().map(|&p| t.shape[p]).collect::<Vec<_>>()))
        }
        Op::Slice { axis, start, end, step } => {
            arity(inputs, 1)?;
            let t = inputs[0];
            axis_ok(*axis, t.rank())?;
            if *step == 0 || start > end || *end > t.shape[*axis] {
                return Err(format!("slice {start}..{end} step {step} of axis {axis} in {t}"));
            }
            let mut shape = t.shape.clone();
            shape[*axis] = (end - start).div_ceil(*step);
            Ok(TensorType::new(t.dtype, shape))
        }
        Op::Concat { axis } => {
            let first = inputs.first().ok_or("concat of nothing")?;
            axis_ok(*axis, first.rank())?;
            let mut shape = first.shape.clone();
            shape[*axis] = 0;
            for t in inputs {
                let same =
                    t.rank() == first.rank() && t.dtype == first.dtype && (0..t.rank()).all(|i| i == *axis || t.shape[i] == first.shape[i]);
                if !same {
                    return Err(format!("cannot concatenate {t} with {first} on axis {axis}"));
                }
                shape[*axis] += t.shape[*axis];
            }
            Ok(TensorType::new(first.dtype, shape))
        }
        Op::WriteSlice { axis } => {
            arity(inputs, 3)?;
            let (dst, rows, at) = (inputs[0], inputs[1], inputs[2]);
            axis_ok(*axis, dst.rank())?;
            integer(at, "the write position")?;
            let fits = rows.rank() == dst.rank()
                && rows.dtype == dst.dtype
                && (0..dst.rank()).all(|i| if i == *axis { rows.shape[i] <= dst.shape[i] } else { rows.shape[i] == dst.shape[i] });
            if !fits || at.shape != [1] {
                return Err(format!("cannot write {rows} into {dst} along axis {axis} at {at} (want rows of dst's shape, position [1])"));
            }
            Ok(dst.clone())
        }
        Op::Broadcast { shape } => {
            arity(inputs, 1)?;
            let t = inputs[0];
            if bcast(&t.shape, shape)? != *shape {
                return Err(format!("cannot broadcast {t} to {shape:?}"));
            }
            Ok(TensorType::new(t.dtype, shape.clone()))
        }
        _ => unreachable!("{} is not dispatched to movement", op.name()),
    }
}

/// Gather, take-along-axis, scatter-add, top-k, cumsum, resize.
fn indexing(op: &Op, inputs: &[&TensorType]) -> R {
    match op {
        Op::Gather { axis } => {
            arity(inputs, 2)?;
            let (x, idx) = (inputs[0], inputs[1]);
            axis_ok(*axis, x.rank())?;
            integer(idx, "indices")?;
            let mut shape = x.shape[..*axis].to_vec();
            shape.extend(&idx.shape);
            shape.extend(&x.shape[axis + 1..]);
            Ok(TensorType::new(x.dtype, shape))
        }
        Op::TakeAlongAxis { axis } => {
            arity(inputs, 2)?;
            let (x, idx) = (inputs[0], inputs[1]);
            axis_ok(*axis, x.rank())?;
            integer(idx, "indices")?;
            let ok = idx.rank() == x.rank() && (0..x.rank()).all(|i| i == *axis || idx.shape[i] == x.shape[i]);
            if !ok {
                return Err(format!("indices {idx} do not match {x} off axis {axis}"));
            }
            Ok(TensorType::new(x.dtype, idx.shape.clone()))
        }
        Op::ScatterAdd { axis } => {
            arity(inputs, 3)?;
            let (base, idx, src) = (inputs[0], inputs[1], inputs[2]);
            axis_ok(*axis, base.rank())?;
            integer(idx, "indices")?;
            if idx.shape != src.shape || src.dtype != base.dtype || src.rank() != base.rank() {
                return Err(format!("scatter of {src} at {idx} into {base}"));
            }
            if (0..base.rank()).any(|i| i != *axis && src.shape[i] != base.shape[i]) {
                return Err(format!("source {src} and base {base} differ off axis {axis}"));
            }
            Ok(base.clone())
        }
        Op::TopK { k } => {
            arity(inputs, 1)?;
            let t = inputs[0];
            let last = *t.shape.last().ok_or("top-k of a scalar")?;
            if *k == 0 || *k > last {
                return Err(format!("k = {k} for a last axis of {last}"));
            }
            let mut shape = t.shape.clone();
            *shape.last_mut().ok_or("top-k of a scalar")? = *k;
            Ok(TensorType::new(DType::I64, shape))
        }
        Op::CumSum { axis, .. } => {
            arity(inputs, 1)?;
            axis_ok(*axis, inputs[0].rank())?;
            Ok(inputs[0].clone())
        }
        Op::Resize { size, .. } => {
            arity(inputs, 1)?;
            let t = inputs[0];
            float(t, "input")?;
            if t.rank() < 2 || size.contains(&0) {
                return Err(format!("cannot resize {t} to {size:?}"));
            }
            let mut shape = t.shape.clone();
            let r = shape.len();
            shape[r - 2] = size[0];
            shape[r - 1] = size[1];
            Ok(TensorType::new(t.dtype, shape))
        }
        _ => unreachable!("{} is not dispatched to indexing", op.name()),
    }
}

/// Reductions, matmul, softmax, norms, attention, MoE dispatch and combine.
fn compute(op: &Op, inputs: &[&TensorType]) -> R {
    match op {
        Op::Reduce { axes, keep_dims, .. } => {
            arity(inputs, 1)?;
            let t = inputs[0];
            for w in axes.windows(2) {
                if w[0] >= w[1] {
                    return Err(format!("axes {axes:?} must be sorted and unique"));
                }
            }
            for &a in axes {
                axis_ok(a, t.rank())?;
            }
            let shape =
                (0..t.rank()).filter_map(|i| if axes.contains(&i) { keep_dims.then_some(1) } else { Some(t.shape[i]) }).collect::<Vec<_>>();
            Ok(TensorType::new(t.dtype, shape))
        }
        Op::MatMul { transpose_b, epilogue } => {
            let (a, b) = matmul_operands(inputs)?;
            if a.rank() < 2 || b.rank() < 2 {
                return Err(format!("operands need rank >= 2: {a} x {b}"));
            }
            let (m, k) = (a.shape[a.rank() - 2], a.shape[a.rank() - 1]);
            let (kb, n) =
                if *transpose_b { (b.shape[b.rank() - 1], b.shape[b.rank() - 2]) } else { (b.shape[b.rank() - 2], b.shape[b.rank() - 1]) };
            if k != kb {
                return Err(format!("contraction sizes differ: {a} x {b} (transpose_b={transpose_b})"));
            }
            let mut shape = bcast(&a.shape[..a.rank() - 2], &b.shape[..b.rank() - 2])?;
            shape.extend([m, n]);
            let product = TensorType::new(a.dtype, shape);
            match epilogue {
                // The epilogue reads the product (in the operands' dtype) and may end with a
                // cast (a bf16 head's logits in f32).
                Some(e) => {
                    let mut ins = vec![&product];
                    ins.extend(inputs[2..].iter().copied());
                    let dtype = check_expr(e, &ins, &product.shape)?;
                    if e.arity() != ins.len() {
                        return Err(format!("epilogue reads {} inputs, node gives {}", e.arity(), ins.len()));
                    }
                    Ok(TensorType::new(dtype, product.shape))
                }
                None => {
                    arity(inputs, 2)?;
                    Ok(product)
                }
            }
        }
        Op::Softmax { axis } => {
            arity(inputs, 1)?;
            float(inputs[0], "input")?;
            axis_ok(*axis, inputs[0].rank())?;
            Ok(inputs[0].clone())
        }
        Op::LayerNorm { .. } => {
            arity(inputs, 3)?;
            norm_params(inputs)
        }
        Op::RmsNorm { .. } => {
            arity(inputs, 2)?;
            norm_params(inputs)
        }
        Op::Attention(a) => {
            let want = match a.mask {
                MaskKind::Additive => 4,
                MaskKind::Positions(pm) => pm.arity(),
                MaskKind::None | MaskKind::Causal { .. } | MaskKind::SlidingWindow { .. } => 3,
            };
            arity(inputs, want)?;
            let (q, k, v) = (inputs[0], inputs[1], inputs[2]);
            float(q, "q")?;
            if q.rank() != 4 || k.rank() != 4 || v.rank() != 4 {
                return Err(format!("q, k, v must be [B,S,H,D]: {q}, {k}, {v}"));
            }
            if q.dtype != k.dtype || q.dtype != v.dtype {
                return Err(format!("dtypes differ: {q}, {k}, {v}"));
            }
            let (b, sq, hq, d) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3]);
            let (sk, hkv) = (k.shape[1], k.shape[2]);
            if k.shape[0] != b || k.shape[3] != d || v.shape[0] != b || v.shape[1] != sk || v.shape[2] != hkv {
                return Err(format!("k {k} and v {v} do not match q {q}"));
            }
            if hkv == 0 || hq % hkv != 0 {
                return Err(format!("{hq} query heads cannot share {hkv} kv heads"));
            }
            if a.mask == MaskKind::Additive {
                let m = inputs[3];
                if m.shape != [b, sq, sk] || m.dtype != q.dtype {
                    return Err(format!("mask must be {}[{b},{sq},{sk}], got {m}", q.dtype));
                }
            }
            if let MaskKind::Positions(pm) = a.mask {
                let mut want = vec![("start", vec![1])];
                if pm.padding {
                    want.push(("keep", vec![b, sk]));
                }
                if pm.prefix {
                    want.push(("prefix", vec![b]));
                }
                for ((name, shape), t) in want.into_iter().zip(&inputs[3..]) {
                    if t.dtype != DType::I64 || t.shape != shape {
                        return Err(format!("the mask's {name} must be i64{shape:?}, got {t}"));
                    }
                }
            }
            Ok(TensorType::new(q.dtype, [b, sq, hq, v.shape[3]]))
        }
        Op::MoeDispatch { rows } => {
            arity(inputs, 2)?;
            let (x, slot) = (inputs[0], inputs[1]);
            float(x, "x")?;
            integer(slot, "slots")?;
            if x.rank() != 2 || slot.rank() != 2 || slot.shape[0] != x.shape[0] {
                return Err(format!("dispatch needs x [T, D] and slots [T, K], got {x} and {slot}"));
            }
            Ok(TensorType::new(x.dtype, [*rows, x.shape[1]]))
        }
        Op::MoeCombine => {
            arity(inputs, 3)?;
            let (y, slot, w) = (inputs[0], inputs[1], inputs[2]);
            float(y, "y")?;
            integer(slot, "slots")?;
            if y.rank() != 2 || slot.rank() != 2 || w.shape != slot.shape || w.dtype != y.dtype {
                return Err(format!("combine needs y [R, D], slots [T, K] and weights {}[T, K], got {y}, {slot}, {w}", y.dtype));
            }
            Ok(TensorType::new(y.dtype, [slot.shape[0], y.shape[1]]))
        }
        _ => unreachable!("{} is not dispatched to compute", op.name()),
    }
}

/// `x [.., d]`, `o` (x's type), `w_post [d]` when `post`, `w_pre [d]` give `[2 rows_pad, d]`.
fn residual_rms_norm(r: &crate::op::ResidualRmsNorm, inputs: &[&TensorType]) -> R {
    arity(inputs, if r.post { 4 } else { 3 })?;
    let (x, o) = (inputs[0], inputs[1]);
    if o != x {
        return Err(format!("the residual {x} and the added {o} must have one type"));
    }
    let mut params = vec![x];
    params.extend(&inputs[2..]);
    norm_params(&params)?;
    let d = *x.shape.last().ok_or("normalising a scalar")?;
    let rows = x.numel() / d.max(1);
    if r.rows_pad < rows {
        return Err(format!("rows_pad {} is less than the {rows} rows of {x}", r.rows_pad));
    }
    Ok(TensorType::new(x.dtype, [2 * r.rows_pad, d]))
}

fn norm_params(inputs: &[&TensorType]) -> R {
    let x = inputs[0];
    float(x, "input")?;
    let d = *x.shape.last().ok_or("normalising a scalar")?;
    for p in &inputs[1..] {
        if p.shape != [d] || p.dtype != x.dtype {
            return Err(format!("parameter {p} must be {}[{d}]", x.dtype));
        }
    }
    Ok(x.clone())
}

/// `logits [B, V]` (float), `options [2]` (f32), `counters [4]` (i64), `streams [B]` (i64)
/// give ids `[B]` (i64).
fn sample_token(inputs: &[&TensorType]) -> R {
    arity(inputs, 4)?;
    let (l, o, c, s) = (inputs[0], inputs[1], inputs[2], inputs[3]);
    if l.rank() != 2 || !l.dtype.is_float() || l.shape[1] == 0 {
        return Err(format!("logits {l}: expected a float [B, V] with V >= 1"));
    }
    if o.dtype != DType::F32 || o.shape.to_vec() != [2] {
        return Err(format!("options {o}: expected f32[2] (temperature, top-p)"));
    }
    if c.dtype != DType::I64 || c.shape.to_vec() != [4] {
        return Err(format!("counters {c}: expected i64[4] (top-k, seed high, seed low, step)"));
    }
    if s.dtype != DType::I64 || s.shape.to_vec() != [l.shape[0]] {
        return Err(format!("streams {s}: expected i64[{}]", l.shape[0]));
    }
    Ok(TensorType::new(DType::I64, [l.shape[0]]))
}
