//! The text form of a graph: one line per node, `%id = op[attrs](inputs) : type`.

use crate::graph::Graph;
use crate::op::{Expr, Instr, MaskKind, Op};
use std::fmt::Write;

/// Prints a fused expression as a nested formula over `$i` inputs.
pub fn expr_to_string(e: &Expr) -> String {
    let mut parts: Vec<String> = Vec::with_capacity(e.instrs.len());
    for ins in &e.instrs {
        let s = match *ins {
            Instr::Input(i) => format!("${i}"),
            Instr::Const(c) => format!("{c:?}"),
            Instr::Unary(op, a) => format!("{}({})", format!("{op:?}").to_lowercase(), parts[a as usize]),
            Instr::Binary(op, a, b) => format!("{}({}, {})", format!("{op:?}").to_lowercase(), parts[a as usize], parts[b as usize]),
            Instr::Select(c, a, b) => format!("select({}, {}, {})", parts[c as usize], parts[a as usize], parts[b as usize]),
        };
        parts.push(s);
    }
    parts.pop().unwrap_or_default()
}

/// The attributes of an op as they appear between brackets.
pub fn attrs(op: &Op) -> String {
    match op {
        Op::Input { name } | Op::Weight { name } => format!("\"{name}\""),
        Op::Constant { values } => {
            if values.len() <= 4 {
                format!("{values:?}")
            } else {
                format!("{} values", values.len())
            }
        }
        Op::Iota { axis, start, step } => format!("axis={axis}, start={start}, step={step}"),
        Op::Unary(u) => format!("{u:?}").to_lowercase(),
        Op::Binary(b) => format!("{b:?}").to_lowercase(),
        Op::Select => String::new(),
        Op::Cast { to } => to.to_string(),
        Op::Reduce { op, axes, keep_dims } => format!("{}, axes={axes:?}, keep_dims={keep_dims}", format!("{op:?}").to_lowercase()),
        Op::MatMul { transpose_b, epilogue } => {
            let mut s = if *transpose_b { "b^T".to_string() } else { String::new() };
            if let Some(e) = epilogue {
                let _ = write!(s, "{}epilogue={}", if s.is_empty() { "" } else { ", " }, expr_to_string(e));
            }
            s
        }
        Op::Reshape { shape } => format!("{shape:?}"),
        Op::Permute { perm } => format!("{perm:?}"),
        Op::Slice { axis, start, end, step } => format!("axis={axis}, {start}..{end}, step={step}"),
        Op::Concat { axis } | Op::WriteSlice { axis } | Op::Gather { axis } | Op::TakeAlongAxis { axis } | Op::ScatterAdd { axis } => {
            format!("axis={axis}")
        }
        Op::Broadcast { shape } => format!("{shape:?}"),
        Op::TopK { k } => format!("k={k}"),
        Op::CumSum { axis, exclusive } => format!("axis={axis}, exclusive={exclusive}"),
        Op::Resize { size, mode } => format!("{size:?}, {}", format!("{mode:?}").to_lowercase()),
        Op::Softmax { axis } => format!("axis={axis}"),
        Op::LayerNorm { eps } => format!("eps={eps:e}"),
        Op::RmsNorm { eps, add_one } => format!("eps={eps:e}, add_one={add_one}"),
        Op::Attention(a) => {
            let mask = match a.mask {
                MaskKind::None => "none".to_string(),
                MaskKind::Causal { q_offset } => format!("causal(+{q_offset})"),
                MaskKind::SlidingWindow { q_offset, window } => format!("window({window}, +{q_offset})"),
                MaskKind::Additive => "additive".to_string(),
            };
            let cap = a.softcap.map(|c| format!(", softcap={c}")).unwrap_or_default();
            format!("scale={}, mask={mask}{cap}", a.scale)
        }
        Op::MoeDispatch { rows } => format!("rows={rows}"),
        Op::MoeCombine => String::new(),
        Op::Fused(e) => expr_to_string(e),
    }
}

/// Prints a graph as text, one node per line, then its outputs.
pub fn print(g: &Graph) -> String {
    let mut s = String::new();
    for (i, n) in g.nodes.iter().enumerate() {
        let ins: Vec<String> = n.inputs.iter().map(|x| x.to_string()).collect();
        let a = attrs(&n.op);
        let a = if a.is_empty() { String::new() } else { format!("[{a}]") };
        let _ = writeln!(s, "%{i} = {}{a}({}) : {}", n.op.name(), ins.join(", "), n.ty);
    }
    for (name, id) in &g.outputs {
        let _ = writeln!(s, "output \"{name}\" = {id}");
    }
    s
}
