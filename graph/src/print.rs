//! The text form of a graph: one line per node, `%id = op[attrs](inputs) : type`.

use crate::graph::Graph;
use crate::op::Expr;
use std::fmt::Write;

/// Prints a fused expression as a nested formula over `$i` inputs ([`Expr::formula`]).
pub fn expr_to_string(e: &Expr) -> String {
    e.formula()
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
