//! Independent steps run as one parallel dispatch (issue 16): where consecutive launching steps
//! are RoPE rotations (with or without the cache write they store, [`super::rotary`]), cache
//! writes (`write_slice`, `concat`) or GEMMs, and none writes a byte another reads or writes,
//! the first runs them all as the tasks of one rayon dispatch (one join at the end; each task's
//! own parallel loop is nested in it) and the others make no launch. In a Gemma layer that is
//! q's rotation, k's rotation with K's cache write, and V's cache write (decode's three launches
//! after the QKV GEMM become one, prefill's likewise), and prefill's Q and stacked K/V GEMMs,
//! which read one activation and write apart (the graph's scheduler runs such sibling
//! projections side by side: `kiln_graph::sched::sibling_edges`).
//!
//! The grouping is worked out from the program alone, after the memory plan ([`plan`]), so
//! the counts `kiln inspect` prints and the run agree. Steps that launch nothing (views,
//! sources, writes done inside their rotation) neither join nor end a group; any other
//! launching step ends it, so a group's steps are consecutive in the launch order and run
//! together at the first one's place: moving the later ones earlier past steps that do nothing
//! changes no byte.

use super::kernel::CpuKernel;
use super::rotary::{overlap, place, Place, Role, Roles};
use kiln_graph::program::{Entry, Step};

/// A step's part in its entry's groups.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Part {
    /// Runs in its own launch (or launches nothing).
    Alone,
    /// Runs these steps (itself first) as one dispatch.
    Leads(Vec<usize>),
    /// Runs in the dispatch of the group led by this step.
    In(usize),
}

/// Whether step `s` with rotary role `r` launches anything on the cpu.
fn launches(s: &Step, r: &Role) -> bool {
    *r != Role::Absorbed && !matches!(CpuKernel::parse(&s.kernel), Some(CpuKernel::Source | CpuKernel::View) | None)
}

/// Whether step `s` may share a dispatch: a rotation, a cache write's copy, or a GEMM (the
/// kernels that keep no state between calls but per-thread scratch).
fn joinable(s: &Step, r: &Role) -> bool {
    use CpuKernel as K;
    match r {
        Role::Rotate(_) | Role::Host(_) => true,
        Role::Alone => {
            matches!(CpuKernel::parse(&s.kernel), Some(K::WriteSlice | K::Concat | K::Gemm | K::GemmEpilogue | K::GemmGated))
        }
        Role::Absorbed => false,
    }
}

/// The bytes a step reads, and those it writes.
type Footprint = (Vec<Place>, Vec<Place>);

/// What step `i` reads and writes, its absorbed cache write included.
fn footprint(e: &Entry, roles: &Roles, i: usize) -> Footprint {
    let mut steps = vec![&e.steps[i]];
    if let Role::Host(k) = roles.role[i] {
        steps.push(&e.steps[roles.pairs[k].write]);
    }
    let reads = steps.iter().flat_map(|s| s.inputs.iter().map(place)).collect();
    let writes = steps.iter().map(|s| place(&s.output)).collect();
    (reads, writes)
}

/// Whether two footprints may run at once: neither writes what the other reads or writes.
fn independent(a: &Footprint, b: &Footprint) -> bool {
    let hits = |w: &[Place], other: &Footprint| w.iter().any(|&x| other.0.iter().chain(&other.1).any(|&y| overlap(x, y)));
    !hits(&a.1, b) && !hits(&b.1, a)
}

/// The part each step of `e` plays, given its rotary `roles`.
pub(crate) fn plan(e: &Entry, roles: &Roles) -> Vec<Part> {
    let mut parts = vec![Part::Alone; e.steps.len()];
    let mut group: Vec<(usize, Footprint)> = Vec::new();
    let mut close = |group: &mut Vec<(usize, Footprint)>| {
        if group.len() > 1 {
            let lead = group[0].0;
            parts[lead] = Part::Leads(group.iter().map(|g| g.0).collect());
            for g in &group[1..] {
                parts[g.0] = Part::In(lead);
            }
        }
        group.clear();
    };
    for (i, s) in e.steps.iter().enumerate() {
        let r = &roles.role[i];
        if !launches(s, r) {
            continue;
        }
        if !joinable(s, r) {
            close(&mut group);
            continue;
        }
        let f = footprint(e, roles, i);
        if !group.iter().all(|(_, g)| independent(g, &f)) {
            close(&mut group);
        }
        group.push((i, f));
    }
    close(&mut group);
    parts
}

#[cfg(test)]
mod tests {
    use super::super::rotary::tests::{arena, rotate_half, rows, D};
    use super::*;
    use kiln_graph::program::{Io, Operand, PlanStats, Slot};
    use kiln_graph::{DType, Op, TensorType, UnaryOp};

    fn cache(i: u32) -> Operand {
        Operand { slot: Slot::State(i), ty: TensorType::new(DType::F32, [1, 4, 2, D]) }
    }

    fn step(op: Op, kernel: &str, inputs: Vec<Operand>, output: Operand) -> Step {
        Step { node: 0, op, kernel: kernel.into(), inputs, output }
    }

    fn rot(x: usize, out: usize) -> Step {
        let p = Operand { slot: Slot::Const(0), ty: TensorType::new(DType::F32, [D, D]) };
        step(Op::MatMul { epilogue: None, transpose_b: false }, "cpu.gemm", vec![arena(x, rows()), p], arena(out, rows()))
    }

    fn write(state: u32, rows_at: usize, pos: usize) -> Step {
        let inputs = vec![cache(state), arena(rows_at, rows()), arena(pos, TensorType::new(DType::I64, [1]))];
        step(Op::WriteSlice { axis: 1 }, "cpu.write_slice", inputs, cache(state))
    }

    fn exp(input: Operand, out: usize) -> Step {
        let ty = input.ty.clone();
        step(Op::Unary(UnaryOp::Exp), "cpu.fused", vec![input], arena(out, ty))
    }

    fn parts(steps: Vec<Step>) -> Vec<Part> {
        let e = Entry {
            name: "decode".into(),
            inputs: vec![],
            outputs: Vec::<Io>::new(),
            steps,
            arena_bytes: 1 << 16,
            plan: PlanStats::default(),
        };
        let roles = Roles::of(&e, &[rotate_half()]);
        plan(&e, &roles)
    }

    #[test]
    fn a_layers_rotations_and_cache_writes_are_one_dispatch() {
        // V's write, k's rotation with K's write (absorbed), q's rotation: one group.
        let p = parts(vec![write(1, 0, 8192), rot(256, 1024), rot(512, 2048), write(0, 1024, 8192), exp(arena(2048, rows()), 4096)]);
        assert_eq!(p, [Part::Leads(vec![0, 1, 2]), Part::In(0), Part::In(0), Part::Alone, Part::Alone]);
    }

    fn gemm(x: usize, out: usize) -> Step {
        let w = Operand { slot: Slot::Weight(0), ty: TensorType::new(DType::F32, [D, D]) };
        step(Op::MatMul { epilogue: None, transpose_b: true }, "cpu.gemm", vec![arena(x, rows()), w], arena(out, rows()))
    }

    #[test]
    fn sibling_gemms_are_one_dispatch_and_their_readers_another() {
        // Q's and K/V's GEMMs of one activation, then q's rotation reading the first.
        let p = parts(vec![gemm(0, 1024), gemm(0, 2048), rot(1024, 4096), write(1, 2048, 8192)]);
        assert_eq!(p, [Part::Leads(vec![0, 1]), Part::In(0), Part::Leads(vec![2, 3]), Part::In(2)]);
        // A GEMM of the previous one's output.
        assert_eq!(parts(vec![gemm(0, 1024), gemm(1024, 2048)]), [Part::Alone, Part::Alone]);
    }

    #[test]
    fn dependent_or_separated_steps_keep_their_launches() {
        // The second rotation reads the first's output.
        assert_eq!(parts(vec![rot(0, 1024), rot(1024, 2048)]), [Part::Alone, Part::Alone]);
        // Two writes into one state.
        assert_eq!(parts(vec![write(0, 0, 8192), write(0, 1024, 8192)]), [Part::Alone, Part::Alone]);
        // A write of rows a rotation is computing.
        assert_eq!(parts(vec![rot(0, 1024), write(1, 1024, 8192)]), [Part::Alone, Part::Alone]);
        // A launching step between that does not join (an elementwise region) ends the group.
        let p = parts(vec![rot(0, 1024), exp(arena(4096, rows()), 5120), rot(256, 2048)]);
        assert_eq!(p, [Part::Alone, Part::Alone, Part::Alone]);
        // A step that starts a new group after a conflict: the first stays alone.
        let p = parts(vec![rot(0, 1024), rot(1024, 2048), write(1, 0, 8192)]);
        assert_eq!(p, [Part::Alone, Part::Leads(vec![1, 2]), Part::In(1)]);
    }
}
