//! One interpreter arm per op, on f64 data in row-major order.

use super::Value;
use crate::dtype::{broadcast_strides, strides, TensorType};
use crate::op::{Attention, Expr, MaskKind, Op, ReduceOp, ResizeMode};
use crate::scalar;

type R = Result<Vec<f64>, String>;

/// Multi-index iterator helper: the flat offset in a tensor with `st` strides of the
/// element at flat index `i` of `shape`.
fn offset(mut i: usize, shape: &[usize], st: &[usize]) -> usize {
    let mut off = 0;
    for d in (0..shape.len()).rev() {
        let n = shape[d];
        off += (i % n) * st[d];
        i /= n;
    }
    off
}

/// Reads each input broadcast to `shape`, then applies `f` elementwise.
fn map_broadcast(args: &[&Value], shape: &[usize], mut f: impl FnMut(&[f64]) -> f64) -> Vec<f64> {
    let n: usize = shape.iter().product();
    let sts: Vec<Vec<usize>> = args.iter().map(|a| broadcast_strides(&a.ty.shape, shape)).collect();
    let mut buf = vec![0.0; args.len()];
    (0..n)
        .map(|i| {
            for (k, a) in args.iter().enumerate() {
                buf[k] = a.data[offset(i, shape, &sts[k])];
            }
            f(&buf)
        })
        .collect()
}

fn index(v: f64, len: usize, what: &str) -> Result<usize, String> {
    if v < 0.0 || v >= len as f64 {
        return Err(format!("{what} index {v} out of range 0..{len}"));
    }
    Ok(v as usize)
}

/// Splits a shape at `axis` into (outer, len, inner).
fn split(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (shape[..axis].iter().product(), shape[axis], shape[axis + 1..].iter().product())
}

/// Appends `row / sqrt(mean(row^2) + eps) * (add_one ? 1 + w : w)` to `v`.
fn rms_row(row: &[f64], w: &[f64], eps: f32, add_one: bool, v: &mut Vec<f64>) {
    let ms = row.iter().map(|x| x * x).sum::<f64>() / row.len().max(1) as f64;
    let r = 1.0 / (ms + eps as f64).sqrt();
    let one = if add_one { 1.0 } else { 0.0 };
    v.extend(row.iter().zip(w).map(|(x, w)| x * r * (one + w)));
}

/// [`Op::ResidualRmsNorm`]: `h` and its norm, each value rounded to the dtype where the
/// unfused ops would store it (the post-norm's result, the sum), so the halves equal what
/// `rms_norm`, `add` and `rms_norm` give.
fn residual_rms_norm(r: &crate::op::ResidualRmsNorm, a: &[&Value], out: &TensorType) -> Vec<f64> {
    let dt = out.dtype;
    let d = *out.shape.last().unwrap_or(&1);
    let (x, o) = (&a[0].data, &a[1].data);
    let w_pre = &a[a.len() - 1].data;
    let mut h = Vec::with_capacity(x.len());
    if r.post {
        for row in o.chunks(d.max(1)) {
            rms_row(row, &a[2].data, r.eps, r.add_one, &mut h);
        }
        for (h, x) in h.iter_mut().zip(x) {
            *h = dt.round(x + dt.round(*h));
        }
    } else {
        h.extend(x.iter().zip(o).map(|(x, o)| dt.round(x + o)));
    }
    let mut v = h.clone();
    v.resize(r.rows_pad * d, 0.0);
    for row in h.chunks(d.max(1)) {
        rms_row(row, w_pre, r.eps, r.add_one, &mut v);
    }
    v.resize(out.numel(), 0.0);
    v
}

/// Evaluates one non-source op.
pub fn eval(op: &Op, a: &[&Value], out: &TensorType) -> R {
    match op {
        Op::Input { .. } | Op::Weight { .. } => Err("sources are read, not evaluated".into()),
        Op::Constant { values } => Ok(values.clone()),
        Op::SampleToken => crate::sample::sample_rows(&a[0].data, &a[1].data, &a[2].data, &a[3].data),
        Op::LogSoftmax => {
            let v = *a[0].ty.shape.last().unwrap_or(&1);
            Ok(a[0].data.chunks(v.max(1)).flat_map(crate::sample::log_softmax).collect())
        }
        Op::TokenLogProb => {
            let v = *a[0].ty.shape.last().unwrap_or(&1);
            let rows = a[0].data.chunks(v.max(1));
            rows.zip(&a[1].data).map(|(row, &id)| Ok(crate::sample::token_log_prob(row, index(id, v, "token_log_prob")?))).collect()
        }
        Op::GatherScaled { axis, scale } => {
            // The gathered values (exact) times the scale, rounded to the dtype by the caller:
            // the unfused `gather(table, ids) * scale`.
            let rows = indexing(&Op::Gather { axis: *axis }, a, out)?;
            Ok(rows.into_iter().map(|x| x * *scale as f64).collect())
        }
        Op::Iota { axis, start, step } => {
            let (_, len, inner) = split(&out.shape, *axis);
            Ok((0..out.numel()).map(|i| start + step * ((i / inner) % len) as f64).collect())
        }
        Op::Unary(u) => Ok(a[0].data.iter().map(|&x| scalar::unary(*u, x)).collect()),
        Op::Binary(b) => Ok(map_broadcast(a, &out.shape, |x| scalar::binary(*b, x[0], x[1]))),
        Op::Select => Ok(map_broadcast(a, &out.shape, |x| if x[0] != 0.0 { x[1] } else { x[2] })),
        Op::Cast { .. } => Ok(a[0].data.clone()),
        Op::Reduce { op, axes, .. } => Ok(reduce(a[0], *op, axes)),
        Op::MatMul { transpose_b, epilogue } => matmul(a, *transpose_b, epilogue.as_ref(), out),
        Op::GatedMatMul { transpose_b, epilogue } => gated_matmul(a, *transpose_b, epilogue, out),
        Op::Reshape { .. } => Ok(a[0].data.clone()),
        Op::Permute { .. } | Op::Slice { .. } | Op::Concat { .. } | Op::WriteSlice { .. } => movement(op, a, out),
        Op::Broadcast { shape } => Ok(map_broadcast(a, shape, |x| x[0])),
        Op::Gather { .. } | Op::TakeAlongAxis { .. } | Op::ScatterAdd { .. } | Op::TopK { .. } | Op::CumSum { .. } => indexing(op, a, out),
        Op::Resize { size, mode } => Ok(resize(a[0], *size, *mode)),
        Op::Softmax { axis } => {
            let (outer, len, inner) = split(&a[0].ty.shape, *axis);
            let mut v = vec![0.0; out.numel()];
            for o in 0..outer {
                for k in 0..inner {
                    let at = |j: usize| (o * len + j) * inner + k;
                    let m = (0..len).map(|j| a[0].data[at(j)]).fold(f64::NEG_INFINITY, f64::max);
                    let s: f64 = (0..len).map(|j| (a[0].data[at(j)] - m).exp()).sum();
                    for j in 0..len {
                        v[at(j)] = (a[0].data[at(j)] - m).exp() / s;
                    }
                }
            }
            Ok(v)
        }
        Op::LayerNorm { eps } => {
            let d = *out.shape.last().unwrap_or(&1);
            let mut v = Vec::with_capacity(out.numel());
            for row in a[0].data.chunks(d.max(1)) {
                let mean = row.iter().sum::<f64>() / d as f64;
                let var = row.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / d as f64;
                let r = 1.0 / (var + *eps as f64).sqrt();
                v.extend(row.iter().enumerate().map(|(j, x)| (x - mean) * r * a[1].data[j] + a[2].data[j]));
            }
            Ok(v)
        }
        Op::RmsNorm { eps, add_one } => {
            let d = *out.shape.last().unwrap_or(&1);
            let mut v = Vec::with_capacity(out.numel());
            for row in a[0].data.chunks(d.max(1)) {
                rms_row(row, &a[1].data, *eps, *add_one, &mut v);
            }
            Ok(v)
        }
        Op::ResidualRmsNorm(r) => Ok(residual_rms_norm(r, a, out)),
        Op::Attention(at) => Ok(attention(a, at, out)),
        Op::Conv(c) => Ok(conv(a[0], a[1], c, out)),
        Op::MoeDispatch { rows } => {
            let (x, slot) = (a[0], a[1]);
            let d = x.ty.shape[1];
            let k = slot.ty.shape[1];
            let mut v = vec![0.0; rows * d];
            for (i, &r) in slot.data.iter().enumerate() {
                if r < 0.0 {
                    continue;
                }
                let r = index(r, *rows, "moe_dispatch")?;
                let t = i / k;
                for c in 0..d {
                    v[r * d + c] += x.data[t * d + c];
                }
            }
            Ok(v)
        }
        Op::MoeCombine => {
            let (y, slot, w) = (a[0], a[1], a[2]);
            let (rows, d) = (y.ty.shape[0], y.ty.shape[1]);
            let k = slot.ty.shape[1];
            let mut v = vec![0.0; out.numel()];
            for (i, &r) in slot.data.iter().enumerate() {
                if r < 0.0 {
                    continue;
                }
                let r = index(r, rows, "moe_combine")?;
                let t = i / k;
                for c in 0..d {
                    v[t * d + c] += w.data[i] * y.data[r * d + c];
                }
            }
            Ok(v)
        }
        Op::Fused(e) => {
            let dtypes = e.dtypes(&a.iter().map(|v| v.ty.dtype).collect::<Vec<_>>())?;
            let mut scratch = Vec::new();
            Ok(map_broadcast(a, &out.shape, |x| e.eval(x, &mut scratch, &dtypes)))
        }
    }
}

/// Permute, slice, concat, write-slice.
fn movement(op: &Op, a: &[&Value], out: &TensorType) -> R {
    match op {
        Op::Permute { perm } => {
            let st = strides(&a[0].ty.shape);
            let pst: Vec<usize> = perm.iter().map(|&p| st[p]).collect();
            Ok((0..out.numel()).map(|i| a[0].data[offset(i, &out.shape, &pst)]).collect())
        }
        Op::Slice { axis, start, step, .. } => {
            let (outer, len, inner) = split(&a[0].ty.shape, *axis);
            let n_out = out.shape[*axis];
            let mut v = Vec::with_capacity(out.numel());
            for o in 0..outer {
                for j in 0..n_out {
                    let base = (o * len + start + j * step) * inner;
                    v.extend_from_slice(&a[0].data[base..base + inner]);
                }
            }
            Ok(v)
        }
        Op::Concat { axis } => {
            let (outer, _, _) = split(&out.shape, *axis);
            let mut v = Vec::with_capacity(out.numel());
            for o in 0..outer {
                for x in a {
                    let (_, len, inner) = split(&x.ty.shape, *axis);
                    v.extend_from_slice(&x.data[o * len * inner..(o + 1) * len * inner]);
                }
            }
            Ok(v)
        }
        Op::WriteSlice { axis } => {
            let (outer, len, inner) = split(&out.shape, *axis);
            let n = a[1].ty.shape[*axis];
            let at = a[2].data[0];
            if at < 0.0 || at + n as f64 > len as f64 {
                return Err(format!("write_slice of {n} rows at {at} does not fit {len} along axis {axis}"));
            }
            let at = at as usize;
            let mut v = a[0].data.clone();
            for o in 0..outer {
                let dst = (o * len + at) * inner;
                v[dst..dst + n * inner].copy_from_slice(&a[1].data[o * n * inner..(o + 1) * n * inner]);
            }
            Ok(v)
        }
        _ => unreachable!("{} is not dispatched to movement", op.name()),
    }
}

/// Gather, take-along-axis, scatter-add, top-k, cumsum.
fn indexing(op: &Op, a: &[&Value], out: &TensorType) -> R {
    match op {
        Op::Gather { axis } => {
            let (outer, len, inner) = split(&a[0].ty.shape, *axis);
            let mut v = Vec::with_capacity(out.numel());
            for o in 0..outer {
                for &ix in &a[1].data {
                    let j = index(ix, len, "gather")?;
                    let base = (o * len + j) * inner;
                    v.extend_from_slice(&a[0].data[base..base + inner]);
                }
            }
            Ok(v)
        }
        Op::TakeAlongAxis { axis } => {
            let (_, len, inner) = split(&a[0].ty.shape, *axis);
            let (_, ilen, _) = split(&a[1].ty.shape, *axis);
            (0..out.numel())
                .map(|i| {
                    let (o, k) = (i / (ilen * inner), i % inner);
                    let j = index(a[1].data[i], len, "take_along_axis")?;
                    Ok(a[0].data[(o * len + j) * inner + k])
                })
                .collect()
        }
        Op::ScatterAdd { axis } => {
            let (_, len, inner) = split(&a[0].ty.shape, *axis);
            let (_, ilen, _) = split(&a[1].ty.shape, *axis);
            let mut v = a[0].data.clone();
            for i in 0..a[1].ty.numel() {
                let (o, k) = (i / (ilen * inner), i % inner);
                let j = index(a[1].data[i], len, "scatter_add")?;
                v[(o * len + j) * inner + k] += a[2].data[i];
            }
            Ok(v)
        }
        Op::TopK { k } => {
            let n = *a[0].ty.shape.last().unwrap_or(&1);
            let mut v = Vec::with_capacity(out.numel());
            for row in a[0].data.chunks(n.max(1)) {
                let mut idx: Vec<usize> = (0..n).collect();
                // Stable sort, descending: ties keep the lower index first.
                idx.sort_by(|&i, &j| row[j].partial_cmp(&row[i]).unwrap_or(std::cmp::Ordering::Equal));
                v.extend(idx[..*k].iter().map(|&i| i as f64));
            }
            Ok(v)
        }
        Op::CumSum { axis, exclusive } => {
            let (outer, len, inner) = split(&a[0].ty.shape, *axis);
            let mut v = vec![0.0; out.numel()];
            for o in 0..outer {
                for k in 0..inner {
                    let mut acc = 0.0;
                    for j in 0..len {
                        let i = (o * len + j) * inner + k;
                        if *exclusive {
                            v[i] = acc;
                            acc += a[0].data[i];
                        } else {
                            acc += a[0].data[i];
                            v[i] = acc;
                        }
                    }
                }
            }
            Ok(v)
        }
        _ => unreachable!("{} is not dispatched to indexing", op.name()),
    }
}

fn reduce(x: &Value, op: ReduceOp, axes: &[usize]) -> Vec<f64> {
    let shape = &x.ty.shape;
    let kept: Vec<usize> = shape.iter().enumerate().map(|(i, &d)| if axes.contains(&i) { 1 } else { d }).collect();
    let n_out: usize = kept.iter().product();
    let count: usize = axes.iter().map(|&i| shape[i]).product();
    let init = match op {
        ReduceOp::Sum | ReduceOp::Mean => 0.0,
        ReduceOp::Max => f64::NEG_INFINITY,
        ReduceOp::Min => f64::INFINITY,
    };
    let mut acc = vec![init; n_out];
    let kst = broadcast_strides(&kept, shape);
    for (i, &v) in x.data.iter().enumerate() {
        let o = offset(i, shape, &kst);
        acc[o] = match op {
            ReduceOp::Sum | ReduceOp::Mean => acc[o] + v,
            ReduceOp::Max => acc[o].max(v),
            ReduceOp::Min => acc[o].min(v),
        };
    }
    if op == ReduceOp::Mean {
        acc.iter_mut().for_each(|v| *v /= count as f64);
    }
    acc
}

fn matmul(a: &[&Value], transpose_b: bool, epi: Option<&Expr>, out: &TensorType) -> R {
    let (x, w) = (a[0], a[1]);
    let r = out.rank();
    let (m, n) = (out.shape[r - 2], out.shape[r - 1]);
    let k = x.ty.shape[x.ty.rank() - 1];
    let batch_shape = &out.shape[..r - 2];
    let nb: usize = batch_shape.iter().product();
    let xb = broadcast_strides(&x.ty.shape[..x.ty.rank() - 2], batch_shape);
    let wb = broadcast_strides(&w.ty.shape[..w.ty.rank() - 2], batch_shape);
    let mut v = vec![0.0; out.numel()];
    for bi in 0..nb {
        let xo = offset(bi, batch_shape, &xb) * m * k;
        let wo = offset(bi, batch_shape, &wb) * k * n;
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0;
                for l in 0..k {
                    let wv = if transpose_b { w.data[wo + j * k + l] } else { w.data[wo + l * n + j] };
                    s += x.data[xo + i * k + l] * wv;
                }
                v[(bi * m + i) * n + j] = s;
            }
        }
    }
    let Some(e) = epi else { return Ok(v) };
    // The product is rounded to the operands' dtype before the epilogue, as a backend would.
    let pty = TensorType::new(x.ty.dtype, out.shape.clone());
    let prod = Value { data: v.into_iter().map(|v| pty.dtype.round(v)).collect(), ty: pty };
    let mut args = vec![&prod];
    args.extend(a[2..].iter().copied());
    let dtypes = e.dtypes(&args.iter().map(|v| v.ty.dtype).collect::<Vec<_>>())?;
    let mut scratch = Vec::new();
    Ok(map_broadcast(&args, &out.shape, |x| e.eval(x, &mut scratch, &dtypes)))
}

/// [`Op::GatedMatMul`]: both products as [`matmul`] computes them (each rounded to the
/// operands' dtype), then the epilogue, so the result is the unfused steps' bit for bit.
fn gated_matmul(a: &[&Value], transpose_b: bool, e: &Expr, out: &TensorType) -> R {
    let (x, w) = (a[0], a[1]);
    let k = x.ty.shape[x.ty.rank() - 1];
    let (rows, n) = (x.ty.numel() / k.max(1), *out.shape.last().unwrap_or(&0));
    let pty = TensorType::new(x.ty.dtype, out.shape.clone());
    let product = |half: usize| {
        let wo = half * k * n;
        let mut v = vec![0.0; rows * n];
        for i in 0..rows {
            for j in 0..n {
                let mut s = 0.0;
                for l in 0..k {
                    let wv = if transpose_b { w.data[wo + j * k + l] } else { w.data[wo + l * n + j] };
                    s += x.data[i * k + l] * wv;
                }
                v[i * n + j] = pty.dtype.round(s);
            }
        }
        Value { data: v, ty: pty.clone() }
    };
    let (gate, up) = (product(0), product(1));
    let mut args = vec![&gate, &up];
    args.extend(a[2..].iter().copied());
    let dtypes = e.dtypes(&args.iter().map(|v| v.ty.dtype).collect::<Vec<_>>())?;
    let mut scratch = Vec::new();
    Ok(map_broadcast(&args, &out.shape, |x| e.eval(x, &mut scratch, &dtypes)))
}

fn attention(a: &[&Value], at: &Attention, out: &TensorType) -> Vec<f64> {
    let (q, k, v) = (a[0], a[1], a[2]);
    let (b, sq, hq, d) = (q.ty.shape[0], q.ty.shape[1], q.ty.shape[2], q.ty.shape[3]);
    let (sk, hkv, dv) = (k.ty.shape[1], k.ty.shape[2], v.ty.shape[3]);
    let group = hq / hkv;
    let mut o = vec![0.0; out.numel()];
    let mut s = vec![0.0; sk];
    // A position mask's start (query 0's key index); a negative one is read as 0.
    let start = match at.mask {
        MaskKind::Positions(_) => a[3].data[0].max(0.0) as usize,
        MaskKind::None | MaskKind::Causal { .. } | MaskKind::SlidingWindow { .. } | MaskKind::Additive => 0,
    };
    for bi in 0..b {
        let (keep, prefix) = match at.mask {
            MaskKind::Positions(pm) => {
                let keep = pm.padding.then(|| &a[4].data[bi * sk..(bi + 1) * sk]);
                let pi = 4 + usize::from(pm.padding);
                (keep, pm.prefix.then(|| a[pi].data[bi].max(0.0) as usize))
            }
            MaskKind::None | MaskKind::Causal { .. } | MaskKind::SlidingWindow { .. } | MaskKind::Additive => (None, None),
        };
        for h in 0..hq {
            let kh = h / group;
            for i in 0..sq {
                for (j, sj) in s.iter_mut().enumerate() {
                    let mut dot = 0.0;
                    for c in 0..d {
                        dot += q.data[((bi * sq + i) * hq + h) * d + c] * k.data[((bi * sk + j) * hkv + kh) * d + c];
                    }
                    let mut x = dot * at.scale as f64;
                    if let Some(cap) = at.softcap {
                        x = cap as f64 * (x / cap as f64).tanh();
                    }
                    let visible = match at.mask {
                        MaskKind::None | MaskKind::Additive => true,
                        MaskKind::Causal { q_offset } => j <= q_offset + i,
                        MaskKind::SlidingWindow { q_offset, window } => j <= q_offset + i && j + window > q_offset + i,
                        MaskKind::Positions(pm) => pm.visible(start + i, j, keep.map(|k| k[j] != 0.0), prefix),
                    };
                    if at.mask == MaskKind::Additive {
                        x += a[3].data[(bi * sq + i) * sk + j];
                    }
                    *sj = if visible { x } else { f64::NEG_INFINITY };
                }
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                if m == f64::NEG_INFINITY {
                    continue; // a fully masked row gives zeros
                }
                let p: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = p.iter().sum();
                for c in 0..dv {
                    let mut acc = 0.0;
                    for (j, pj) in p.iter().enumerate() {
                        acc += pj * v.data[((bi * sk + j) * hkv + kh) * dv + c];
                    }
                    o[((bi * sq + i) * hq + h) * dv + c] = acc / z;
                }
            }
        }
    }
    o
}

/// PyTorch `interpolate(align_corners=False, antialias=False)` on the last two axes.
fn resize(x: &Value, size: [usize; 2], mode: ResizeMode) -> Vec<f64> {
    let r = x.ty.rank();
    let (ih, iw) = (x.ty.shape[r - 2], x.ty.shape[r - 1]);
    let (oh, ow) = (size[0], size[1]);
    let planes = x.ty.numel() / (ih * iw);
    let taps = |o: usize, i_len: usize, o_len: usize| -> Vec<(usize, f64)> {
        let scale = i_len as f64 / o_len as f64;
        let src = (o as f64 + 0.5) * scale - 0.5;
        let clamp = |t: i64| t.clamp(0, i_len as i64 - 1) as usize;
        match mode {
            ResizeMode::Bilinear => {
                let src = src.max(0.0);
                let i0 = src.floor() as i64;
                let t = src - i0 as f64;
                vec![(clamp(i0), 1.0 - t), (clamp(i0 + 1), t)]
            }
            ResizeMode::Bicubic => {
                let i0 = src.floor() as i64;
                let t = src - i0 as f64;
                let aa = -0.75;
                let near = |d: f64| ((aa + 2.0) * d - (aa + 3.0)) * d * d + 1.0;
                let far = |d: f64| ((aa * d - 5.0 * aa) * d + 8.0 * aa) * d - 4.0 * aa;
                let w = [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)];
                (0..4).map(|q| (clamp(i0 - 1 + q as i64), w[q])).collect()
            }
        }
    };
    let mut v = Vec::with_capacity(planes * oh * ow);
    for p in 0..planes {
        let base = &x.data[p * ih * iw..(p + 1) * ih * iw];
        for oy in 0..oh {
            let ty = taps(oy, ih, oh);
            for ox in 0..ow {
                let tx = taps(ox, iw, ow);
                let mut s = 0.0;
                for &(yy, wy) in &ty {
                    for &(xx, wx) in &tx {
                        s += wy * wx * base[yy * iw + xx];
                    }
                }
                v.push(s);
            }
        }
    }
    v
}

/// [`Op::Conv`], direct or transposed, straight from its definition.
fn conv(x: &Value, w: &Value, c: &crate::op::Conv, out: &TensorType) -> Vec<f64> {
    let (xs, ws, os) = (&x.ty.shape, &w.ty.shape, &out.shape);
    let (b, h, wd, ci) = (xs[0], xs[1], xs[2], xs[3]);
    let (kh, kw, co) = (ws[0], ws[1], ws[3]);
    let (oh, ow) = (os[1], os[2]);
    let mut y = vec![0.0; out.numel()];
    for n in 0..b {
        for (i, j) in (0..h).flat_map(|i| (0..wd).map(move |j| (i, j))) {
            for (p, q) in (0..kh).flat_map(|p| (0..kw).map(move |q| (p, q))) {
                // The input pixel (i, j) and output pixel (r, t) this tap joins.
                let (r, t) = if c.transposed {
                    ((i * c.stride[0] + p).checked_sub(c.pad[0]), (j * c.stride[1] + q).checked_sub(c.pad[1]))
                } else {
                    let (ri, tj) = (i + c.pad[0], j + c.pad[1]);
                    let r = ri.checked_sub(p).filter(|d| d % c.stride[0] == 0).map(|d| d / c.stride[0]);
                    let t = tj.checked_sub(q).filter(|d| d % c.stride[1] == 0).map(|d| d / c.stride[1]);
                    (r, t)
                };
                let (Some(r), Some(t)) = (r, t) else { continue };
                if r >= oh || t >= ow {
                    continue;
                }
                for k in 0..ci {
                    let xv = x.data[((n * h + i) * wd + j) * ci + k];
                    let wrow = ((p * kw + q) * ci + k) * co;
                    let yrow = ((n * oh + r) * ow + t) * co;
                    for o in 0..co {
                        y[yrow + o] += xv * w.data[wrow + o];
                    }
                }
            }
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::op::Conv;

    fn value(shape: &[usize], seed: u64) -> Value {
        let n: usize = shape.iter().product();
        let data = (0..n).map(|i| (((i as u64 + 1) * (seed * 2 + 7919)) % 97) as f64 / 48.0 - 1.0).collect();
        Value { ty: TensorType::new(DType::F32, shape.to_vec()), data }
    }

    /// A position mask gives what the same attention gives with the additive mask its rule
    /// describes (0 or -inf per query and key), for starts, windows, padding and prefixes; a
    /// query that sees no key (all padding) gives zeros both ways.
    #[test]
    fn position_masks_equal_their_additive_masks() {
        use crate::op::PosMask;
        let (b, sq, sk, h, d) = (2, 3, 7, 2, 4);
        let (q, k, v) = (value(&[b, sq, h, d], 1), value(&[b, sk, 1, d], 2), value(&[b, sk, 1, d], 3));
        let ints = |shape: &[usize], data: Vec<f64>| Value { ty: TensorType::new(DType::I64, shape.to_vec()), data };
        // Row 1: keys 0..3 are padding, so its first queries (at start 1) see nothing.
        let keep: Vec<f64> = (0..b * sk).map(|x| f64::from(u8::from(x < sk || x % sk >= 3))).collect();
        let out = TensorType::new(DType::F32, [b, sq, h, d]);
        for (start, window, prefix) in [(0, None, None), (1, Some(2), None), (4, None, Some([5.0, 2.0])), (2, Some(1), Some([4.0, 0.0]))] {
            let pm = PosMask { window, padding: true, prefix: prefix.is_some() };
            let mut args = vec![q.clone(), k.clone(), v.clone(), ints(&[1], vec![start as f64]), ints(&[b, sk], keep.clone())];
            if let Some(p) = prefix {
                args.push(ints(&[b], p.to_vec()));
            }
            let refs: Vec<&Value> = args.iter().collect();
            let got = attention(&refs, &Attention { scale: 0.7, softcap: Some(3.0), mask: MaskKind::Positions(pm) }, &out);
            let mut add = vec![0.0; b * sq * sk];
            for (bi, i, j) in (0..b).flat_map(|bi| (0..sq).flat_map(move |i| (0..sk).map(move |j| (bi, i, j)))) {
                let p = prefix.map(|p| p[bi] as usize);
                if !pm.visible(start + i, j, Some(keep[bi * sk + j] != 0.0), p) {
                    add[(bi * sq + i) * sk + j] = f64::NEG_INFINITY;
                }
            }
            let mask = Value { ty: TensorType::new(DType::F32, [b, sq, sk]), data: add };
            let want = attention(&[&q, &k, &v, &mask], &Attention { scale: 0.7, softcap: Some(3.0), mask: MaskKind::Additive }, &out);
            assert_eq!(got, want, "start {start} window {window:?} prefix {prefix:?}");
        }
        // Start 1, no window: query 0 of row 1 sits at key 1, padding like every key before it.
        let args = [q.clone(), k.clone(), v.clone(), ints(&[1], vec![1.0]), ints(&[b, sk], keep)];
        let refs: Vec<&Value> = args.iter().collect();
        let pm = PosMask { window: None, padding: true, prefix: false };
        let got = attention(&refs, &Attention { scale: 0.7, softcap: None, mask: MaskKind::Positions(pm) }, &out);
        let row = (sq * h) * d; // batch row 1, query 0
        assert!(got[row..row + h * d].iter().all(|&x| x == 0.0), "{:?}", &got[row..row + h * d]);
        assert!(got[..row].iter().any(|&x| x != 0.0));
    }

    fn run_conv(x: &Value, w: &Value, c: Conv) -> Value {
        let [oh, ow] = c.out_hw([x.ty.shape[1], x.ty.shape[2]], [w.ty.shape[0], w.ty.shape[1]]).unwrap();
        let out = TensorType::new(DType::F32, [x.ty.shape[0], oh, ow, w.ty.shape[3]]);
        Value { data: conv(x, w, &c, &out), ty: out }
    }

    /// A direct conv equals the textbook gather form: each output pixel reads its window.
    #[test]
    fn direct_conv_is_the_window_sum() {
        let (x, w) = (value(&[2, 5, 6, 3], 1), value(&[3, 2, 3, 4], 2));
        let c = Conv { stride: [2, 1], pad: [1, 0], transposed: false };
        let y = run_conv(&x, &w, c);
        assert_eq!(y.ty.shape, [2, 3, 5, 4]);
        for (n, r, t, o) in (0..2).flat_map(|n| (0..3).flat_map(move |r| (0..5).flat_map(move |t| (0..4).map(move |o| (n, r, t, o))))) {
            let mut want = 0.0;
            for (p, q, k) in (0..3).flat_map(|p| (0..2).flat_map(move |q| (0..3).map(move |k| (p, q, k)))) {
                let (i, j) = ((r * 2 + p) as isize - 1, (t + q) as isize);
                if (0..5).contains(&i) && (0..6).contains(&j) {
                    want += x.data[((n * 5 + i as usize) * 6 + j as usize) * 3 + k] * w.data[((p * 2 + q) * 3 + k) * 4 + o];
                }
            }
            assert!((y.data[((n * 3 + r) * 5 + t) * 4 + o] - want).abs() < 1e-12);
        }
    }

    /// A transposed conv is the adjoint of the direct conv with the same stride and padding
    /// and the kernel's channel axes swapped: `<conv(x), y> = <x, conv_t(y)>` (what PyTorch's
    /// ConvTranspose2d is), here at the PaliGemma mask decoder's k4 s2 p1 and an odd case.
    #[test]
    fn transposed_conv_is_the_adjoint() {
        for (stride, pad, k, hw) in [([2, 2], [1, 1], [4, 4], [8, 8]), ([3, 2], [2, 0], [5, 3], [9, 7])] {
            let mut x = value(&[1, hw[0], hw[1], 3], 3);
            let w = value(&[k[0], k[1], 3, 2], 4);
            let direct = Conv { stride, pad, transposed: false };
            let y = value(&run_conv(&x, &w, direct).ty.shape, 5);
            let mut wt = w.clone();
            wt.ty.shape = vec![k[0], k[1], 2, 3];
            for (pq, c, o) in (0..k[0] * k[1]).flat_map(|pq| (0..3).flat_map(move |c| (0..2).map(move |o| (pq, c, o)))) {
                wt.data[(pq * 2 + o) * 3 + c] = w.data[(pq * 3 + c) * 2 + o];
            }
            let ty = run_conv(&y, &wt, Conv { transposed: true, ..direct });
            // Without PyTorch's `output_padding` the transposed conv may stop short of x's last
            // rows (those the direct conv's remainder reads): x is zero there, so the identity
            // holds over the common extent.
            let (th, tw) = (ty.ty.shape[1], ty.ty.shape[2]);
            for (i, j, c) in (0..hw[0]).flat_map(|i| (0..hw[1]).flat_map(move |j| (0..3).map(move |c| (i, j, c)))) {
                if i >= th || j >= tw {
                    x.data[(i * hw[1] + j) * 3 + c] = 0.0;
                }
            }
            let cx = run_conv(&x, &w, direct);
            let lhs: f64 = cx.data.iter().zip(&y.data).map(|(a, b)| a * b).sum();
            let mut rhs = 0.0;
            for (i, j, c) in (0..hw[0].min(th)).flat_map(|i| (0..hw[1].min(tw)).flat_map(move |j| (0..3).map(move |c| (i, j, c)))) {
                rhs += x.data[(i * hw[1] + j) * 3 + c] * ty.data[(i * tw + j) * 3 + c];
            }
            assert!((lhs - rhs).abs() < 1e-9 * lhs.abs().max(1.0), "stride {stride:?}: {lhs} vs {rhs}");
        }
        // The mask decoder's upsampling doubles the side: 4 -> 8.
        assert_eq!(Conv { stride: [2, 2], pad: [1, 1], transposed: true }.out_hw([4, 4], [4, 4]), Ok([8, 8]));
    }
}
