//! Dead-code elimination: drop every node no output depends on.

use super::{rebuild, Action};
use crate::error::Result;
use crate::graph::Graph;
use crate::op::Op;

/// Removes nodes no output depends on. Inputs stay even when unused: they are the
/// program's interface. Unused weights and constants go.
pub fn dead_code(g: &Graph) -> Result<Graph> {
    let mut live = vec![false; g.nodes.len()];
    for (_, o) in &g.outputs {
        live[o.index()] = true;
    }
    for i in (0..g.nodes.len()).rev() {
        if live[i] {
            for p in &g.nodes[i].inputs {
                live[p.index()] = true;
            }
        }
    }
    let actions =
        g.nodes.iter().zip(&live).map(|(n, &l)| if l || matches!(n.op, Op::Input { .. }) { Action::Keep } else { Action::Drop }).collect();
    rebuild("dead_code", g, actions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::op::UnaryOp;
    use crate::print::print;

    #[test]
    fn unused_input_survives_and_unused_weight_goes() {
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &[4]).unwrap();
        g.input("unused", DType::F32, &[2]).unwrap();
        let w = g.weight("w", DType::F32, &[4]).unwrap();
        g.unary(UnaryOp::Exp, w).unwrap();
        let y = g.unary(UnaryOp::Neg, x).unwrap();
        g.output("y", y);
        let out = dead_code(&g).unwrap();
        assert_eq!(
            print(&out),
            "%0 = input[\"x\"]() : f32[4]\n%1 = input[\"unused\"]() : f32[2]\n%2 = unary[neg](%0) : f32[4]\noutput \"y\" = %2\n"
        );
    }
}
