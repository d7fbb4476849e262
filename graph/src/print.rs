//! The text form of a graph: one line per node, `%id = op[attrs](inputs) : type`.

use crate::graph::Graph;
use crate::op::{Expr, Instr};
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

/// Prints a graph as text, one node per line, then its outputs.
pub fn print(g: &Graph) -> String {
    let mut s = String::new();
    for (i, n) in g.nodes.iter().enumerate() {
        let ins: Vec<String> = n.inputs.iter().map(|x| x.to_string()).collect();
        let a = n.op.attrs();
        let a = if a.is_empty() { String::new() } else { format!("[{a}]") };
        let _ = writeln!(s, "%{i} = {}{a}({}) : {}", n.op.name(), ins.join(", "), n.ty);
    }
    for (name, id) in &g.outputs {
        let _ = writeln!(s, "output \"{name}\" = {id}");
    }
    s
}
