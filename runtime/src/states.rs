//! Persistent state placed in a device arena, for backends that keep one buffer per program
//! (cube, cuda): each state gets a range above the largest entry arena and every
//! `Slot::State` operand becomes an arena range, so their kernels see plain offsets.

use kiln_graph::program::{Program, Slot};

/// The program with every state operand moved to its range of the arena buffer (states
/// above the largest entry arena, each 256-byte aligned), and those offsets.
pub(crate) fn states_in_arena(program: &Program) -> (Program, Vec<usize>) {
    let mut p = program.clone();
    let mut top = p.entries.iter().map(|e| e.arena_bytes).max().unwrap_or(0).next_multiple_of(256);
    let at: Vec<usize> = p
        .states
        .iter()
        .map(|st| {
            let o = top;
            top += st.ty.bytes().next_multiple_of(256);
            o
        })
        .collect();
    if p.states.is_empty() {
        return (p, at);
    }
    let states = p.states.clone();
    let mv = |o: &mut kiln_graph::program::Operand| {
        if let Slot::State(i) = o.slot {
            if let Some(&offset) = at.get(i as usize) {
                o.slot = Slot::Arena { offset, bytes: states[i as usize].ty.bytes() };
            }
        }
    };
    for e in &mut p.entries {
        e.arena_bytes = top;
        e.inputs.iter_mut().chain(e.outputs.iter_mut()).for_each(|io| mv(&mut io.operand));
        for s in &mut e.steps {
            s.inputs.iter_mut().chain([&mut s.output]).for_each(mv);
        }
    }
    (p, at)
}
