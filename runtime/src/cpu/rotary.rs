//! RoPE's rotation computed inside the KV-cache write that stores it (issue 16): where a
//! rotation step (`x @ P` with `P` a constant signed permutation, its epilogue `x * cos +
//! acc * sin`: [`crate::rotation`]) feeds a cache write (decode's in-place `write_slice` at
//! `cache_position`, a prefill's `concat` into the cache), the rotation's kernel stores each
//! rotated row straight into the cache rows, and the write's step makes no launch. The
//! rotation reads `sign * x[.., perm]` (exact: the product has one nonzero term), so the cpu no
//! longer multiplies by a `D x D` matrix, and its epilogue runs on each block of rows as the
//! GEMM's does: the same bits as the two steps.
//!
//! The pairing is worked out from the program alone, after the memory plan ([`plan`]): the
//! write runs at the rotation's place in the order, so every step between the two must leave
//! the write's other operands and its state alone; the rotated value is also stored in the
//! arena only where another step (prefill's attention) or an entry output reads it.

use super::exec::{Mem, Prep, Prepared};
use super::fused::{Region, Src, MAX_INPUTS};
use crate::geometry::Split;
use crate::rotation::{self, SignedPerm};
use kiln_graph::program::{ConstData, Entry, Operand, Slot, Step};
use kiln_graph::{DType, Op};
use rayon::prelude::*;

/// A rotation step and the cache write that runs in its launch.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct RotaryWrite {
    /// The rotation step: its launch computes both.
    pub rot: usize,
    /// The `write_slice` or `concat` into a state that reads the rotation: no launch of its own.
    pub write: usize,
    /// Which input of the write is the rotated value.
    pub operand: usize,
    /// Whether the rotated value is also stored in its arena slot (some other step or an
    /// entry output reads it there).
    pub keep: bool,
    /// `out[.., c] = sign_c * x[.., src_c]`, per column.
    pub columns: Vec<(usize, bool)>,
}

/// The per-step role of an entry's steps ([`Roles::of`]).
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Role {
    /// Runs its own kernel.
    Alone,
    /// Runs the rotation and the cache write of pair `i`.
    Host(usize),
    /// A rotation feeding no cache write: `sign * x[.., perm]` into its own output, these
    /// columns (`src`, negated).
    Rotate(Vec<(usize, bool)>),
    /// Computed in another step's launch.
    Absorbed,
}

/// The fused pairs of one entry and each step's role.
pub(crate) struct Roles {
    pub pairs: Vec<RotaryWrite>,
    pub role: Vec<Role>,
}

impl Roles {
    /// The roles of `e`'s steps for the program's `constants`.
    pub fn of(e: &Entry, constants: &[ConstData]) -> Roles {
        let pairs = plan(e, constants);
        let perms = rotation::of_constants(constants);
        let role = |s: &Step| match rotation::of_step(s, &perms) {
            Some(p) if rotatable(s) => p.columns().map_or(Role::Alone, Role::Rotate),
            _ => Role::Alone,
        };
        let mut role: Vec<Role> = e.steps.iter().map(role).collect();
        for (i, p) in pairs.iter().enumerate() {
            role[p.rot] = Role::Host(i);
            role[p.write] = Role::Absorbed;
        }
        Roles { pairs, role }
    }
}

/// Bytes an operand covers: arena ranges, a whole state; weights and constants are read-only.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Place {
    Arena(usize, usize),
    State(u32),
    ReadOnly,
}

pub(super) fn place(o: &Operand) -> Place {
    match o.slot {
        Slot::Arena { offset, bytes } => Place::Arena(offset, offset + bytes.max(o.ty.bytes())),
        Slot::State(s) => Place::State(s),
        Slot::Weight(_) | Slot::Const(_) => Place::ReadOnly,
    }
}

pub(super) fn overlap(a: Place, b: Place) -> bool {
    match (a, b) {
        (Place::Arena(a0, a1), Place::Arena(b0, b1)) => a0 < b1 && b0 < a1,
        (Place::State(x), Place::State(y)) => x == y,
        _ => false,
    }
}

/// The rotated value's operand in a write that can take it: an in-place `write_slice` into a
/// state (the value its update) or a `concat` into a state (the value one of its parts), f32,
/// each row of the value landing whole in the state (rows of `d` elements).
fn write_operand(w: &Step, rot: &Operand, d: usize) -> Option<usize> {
    if !matches!(w.output.slot, Slot::State(_)) || w.output.ty.dtype != DType::F32 {
        return None;
    }
    let same = |o: &Operand| o.slot == rot.slot && o.ty.dtype == rot.ty.dtype && o.ty.numel() == rot.ty.numel();
    let (k, axis) = match w.op {
        Op::WriteSlice { axis } if w.inputs.len() == 3 && w.inputs[0].slot == w.output.slot && same(&w.inputs[1]) => (1, axis),
        Op::Concat { axis } => (w.inputs.iter().position(same)?, axis),
        _ => return None,
    };
    // Each outer slice of the part is `len * inner` contiguous elements: whole rows.
    let Split { inner, .. } = Split::at(&w.output.ty.shape, axis);
    let len = *w.inputs[k].ty.shape.get(axis)?;
    (d > 0 && (len * inner).is_multiple_of(d)).then_some(k)
}

/// Whether this backend runs rotation step `s` as a read through its permutation: f32 into
/// the arena.
fn rotatable(s: &Step) -> bool {
    s.output.ty.dtype == DType::F32 && matches!(s.output.slot, Slot::Arena { .. }) && s.inputs.len() - 2 <= MAX_INPUTS
}

/// The rotation steps of `e` whose cache write runs in their launch.
pub(crate) fn plan(e: &Entry, constants: &[ConstData]) -> Vec<RotaryWrite> {
    let perms = rotation::of_constants(constants);
    let mut pairs = Vec::new();
    for (i, s) in e.steps.iter().enumerate() {
        let Some(perm) = rotation::of_step(s, &perms) else { continue };
        if !rotatable(s) {
            continue;
        }
        if let Some(p) = pair(e, i, perm) {
            pairs.push(p);
        }
    }
    pairs
}

fn pair(e: &Entry, i: usize, perm: &SignedPerm) -> Option<RotaryWrite> {
    let rot = &e.steps[i].output;
    let at = place(rot);
    let reads = |s: &Step| s.inputs.iter().any(|o| overlap(place(o), at));
    let covers = |s: &Step| match (place(&s.output), at) {
        (Place::Arena(a0, a1), Place::Arena(b0, b1)) => a0 <= b0 && b1 <= a1,
        _ => false,
    };
    let mut keep = e.outputs.iter().any(|io| overlap(place(&io.operand), at));
    // The first write into a state reading the value, before anything overwrites it.
    let mut found = None;
    for (j, s) in e.steps.iter().enumerate().skip(i + 1) {
        if found.is_none() {
            if let Some(k) = write_operand(s, rot, perm.d) {
                found = Some((j, k));
                continue;
            }
        }
        if reads(s) {
            keep = true;
        }
        if covers(s) || (found.is_none() && overlap(place(&s.output), at)) {
            break;
        }
    }
    let (j, k) = found?;
    // The write moves to step i: no step between touches its state or changes its operands.
    let w = &e.steps[j];
    let others: Vec<Place> = w.inputs.iter().enumerate().filter(|&(n, _)| n != k).map(|(_, o)| place(o)).collect();
    let state = place(&w.output);
    let clear = e.steps[i + 1..j].iter().all(|s| {
        let out = place(&s.output);
        !overlap(out, state) && !s.inputs.iter().any(|o| overlap(place(o), state)) && !others.iter().any(|&p| overlap(out, p))
    });
    let columns = perm.columns()?;
    clear.then_some(RotaryWrite { rot: i, write: j, operand: k, keep, columns })
}

/// Runs pair `p`: the rotation step `r` (its epilogue `region`) stored into the rows the cache
/// write `w` gives it, the write's other parts copied, and the value kept in the arena where
/// [`RotaryWrite::keep`] says so.
pub(super) fn run(mem: &Mem, r: &Step, w: &Step, p: &RotaryWrite, region: Option<&Region>) -> Result<(), String> {
    let cache = mem.f32_mut(&w.output);
    let (axis, at) = match w.op {
        Op::WriteSlice { axis } => (axis, write_at(mem, w, axis)?),
        Op::Concat { axis } => {
            let at: usize = w.inputs[..p.operand].iter().map(|o| o.ty.shape[axis]).sum();
            copy_parts(mem, w, axis, p.operand, cache);
            (axis, at)
        }
        _ => return Err(format!("{} is not a cache write (corrupt program)", w.op.name())),
    };
    let Split { outer, len, inner } = Split::at(&w.output.ty.shape, axis);
    let chunk = w.inputs[p.operand].ty.shape[axis] * inner;
    let mut kept = p.keep.then(|| mem.f32_mut(&r.output));
    for o in 0..outer {
        let dst = &mut cache[(o * len + at) * inner..][..chunk];
        rotate_rows(mem, r, &p.columns, region, dst, o * chunk / p.columns.len());
        if let Some(k) = kept.as_deref_mut() {
            k[o * chunk..(o + 1) * chunk].copy_from_slice(dst);
        }
    }
    Ok(())
}

/// Runs step `i` of `e` as its rotary role says: alone, as a rotation (with the cache write it
/// stores), or not at all (a write its rotation does).
pub(super) fn run_step(mem: &Mem, e: &Entry, roles: &Roles, i: usize, p: &Prepared) -> std::result::Result<(), String> {
    let s = &e.steps[i];
    let epilogue = match &p.prep {
        Prep::MatMul { epilogue, .. } => epilogue.as_ref(),
        _ => None,
    };
    match &roles.role[i] {
        Role::Alone => super::exec::step(mem, s, p.kernel, &p.prep),
        Role::Rotate(columns) => {
            rotate(mem, s, columns, epilogue);
            Ok(())
        }
        Role::Host(k) => {
            let pair = &roles.pairs[*k];
            run(mem, s, &e.steps[pair.write], pair, epilogue)
        }
        Role::Absorbed => Ok(()),
    }
}

/// Runs a rotation step that feeds no cache write as `sign * x[.., perm]` and its epilogue,
/// into its own output: the same bits as its GEMM, with no `D x D` product.
pub(super) fn rotate(mem: &Mem, r: &Step, columns: &[(usize, bool)], region: Option<&Region>) {
    rotate_rows(mem, r, columns, region, mem.f32_mut(&r.output), 0);
}

/// Rows `first..` of rotation step `r`'s value computed into `dst` (whole rows), in parallel
/// over blocks of rows: each block filled with `sign * x[.., perm]`, then its epilogue.
fn rotate_rows(mem: &Mem, r: &Step, columns: &[(usize, bool)], region: Option<&Region>, dst: &mut [f32], first: usize) {
    let d = columns.len();
    let x = mem.f32(&r.inputs[0]);
    let mut extra = [Src::F32(&[]); MAX_INPUTS];
    for (k, o) in r.inputs[2..].iter().enumerate() {
        extra[k] = mem.src(o);
    }
    let extra = &extra[..r.inputs.len() - 2];
    // About 8192 elements a block: filled, then read by the epilogue while in cache.
    let per = (8192 / d.max(1)).max(1);
    dst.par_chunks_mut(per * d).enumerate().for_each(|(b, rows)| {
        let first = first + b * per;
        for (n, row) in rows.chunks_mut(d).enumerate() {
            let src = &x[(first + n) * d..][..d];
            for (v, &(c, neg)) in row.iter_mut().zip(columns) {
                *v = if neg { -src[c] } else { src[c] };
            }
        }
        if let Some(reg) = region {
            reg.eval_rows(extra, rows, first, true);
        }
    });
}

/// A `write_slice`'s row offset, checked as the unfused kernel checks it.
fn write_at(mem: &Mem, w: &Step, axis: usize) -> Result<usize, String> {
    let len = w.output.ty.shape[axis];
    let n = w.inputs[1].ty.shape[axis];
    let at = match w.inputs[2].ty.dtype {
        DType::I32 => bytemuck::cast_slice::<u8, i32>(mem.read(&w.inputs[2]))[0] as i64,
        _ => bytemuck::cast_slice::<u8, i64>(mem.read(&w.inputs[2]))[0],
    };
    if at < 0 || at as usize + n > len {
        return Err(format!("write_slice of {n} rows at {at} does not fit {len} along axis {axis}"));
    }
    Ok(at as usize)
}

/// A concat's parts other than `skip`, copied into `out` (f32).
fn copy_parts(mem: &Mem, w: &Step, axis: usize, skip: usize, out: &mut [f32]) {
    let Split { outer, len: total, inner } = Split::at(&w.output.ty.shape, axis);
    let mut at = 0;
    for (k, o) in w.inputs.iter().enumerate() {
        let len = o.ty.shape[axis];
        if k != skip {
            let src = mem.f32(o);
            for r in 0..outer {
                let n = len * inner;
                out[(r * total + at) * inner..][..n].copy_from_slice(&src[r * n..(r + 1) * n]);
            }
        }
        at += len;
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use kiln_graph::program::{Io, PlanStats};
    use kiln_graph::{TensorType, UnaryOp};

    pub(in crate::cpu) const D: usize = 8;

    pub(in crate::cpu) fn arena(offset: usize, ty: TensorType) -> Operand {
        Operand { slot: Slot::Arena { offset, bytes: ty.bytes().next_multiple_of(256) }, ty }
    }

    pub(in crate::cpu) fn rows() -> TensorType {
        TensorType::new(DType::F32, [1, 1, 2, D])
    }

    fn cache() -> Operand {
        Operand { slot: Slot::State(0), ty: TensorType::new(DType::F32, [1, 4, 2, D]) }
    }

    /// rotate_half over `D` columns, as `rotation_as_matmul` makes it.
    pub(in crate::cpu) fn rotate_half() -> ConstData {
        let mut values = vec![0.0; D * D];
        for c in 0..D {
            let (src, sign) = if c < D / 2 { (c + D / 2, -1.0) } else { (c - D / 2, 1.0) };
            values[src * D + c] = sign;
        }
        ConstData { ty: TensorType::new(DType::F32, [D, D]), values }
    }

    fn step(op: Op, inputs: Vec<Operand>, output: Operand) -> Step {
        Step { node: 0, op, kernel: String::new(), inputs, output }
    }

    /// `x` at `x`, rotated into `out`.
    fn rot(x: usize, out: usize) -> Step {
        let p = Operand { slot: Slot::Const(0), ty: TensorType::new(DType::F32, [D, D]) };
        step(Op::MatMul { epilogue: None, transpose_b: false }, vec![arena(x, rows()), p], arena(out, rows()))
    }

    /// The rows at `rows` written into the cache at the position held at `pos`.
    fn write(rows_at: usize, pos: usize) -> Step {
        let inputs = vec![cache(), arena(rows_at, rows()), arena(pos, TensorType::new(DType::I64, [1]))];
        step(Op::WriteSlice { axis: 1 }, inputs, cache())
    }

    fn exp(input: Operand, out: usize) -> Step {
        let ty = input.ty.clone();
        step(Op::Unary(UnaryOp::Exp), vec![input], arena(out, ty))
    }

    fn entry(steps: Vec<Step>, outputs: Vec<Io>) -> Entry {
        Entry { name: "decode".into(), inputs: vec![], outputs, steps, arena_bytes: 1 << 16, plan: PlanStats::default() }
    }

    fn pairs(steps: Vec<Step>) -> Vec<(usize, usize, bool)> {
        plan(&entry(steps, vec![]), &[rotate_half()]).iter().map(|p| (p.rot, p.write, p.keep)).collect()
    }

    #[test]
    fn a_rotation_feeding_a_cache_write_runs_it() {
        assert_eq!(pairs(vec![rot(0, 1024), write(1024, 2048)]), [(0, 1, false)]);
        // Unrelated steps between, or a reader of the rotated value (kept in the arena then).
        assert_eq!(pairs(vec![rot(0, 1024), exp(arena(4096, rows()), 5120), write(1024, 2048)]), [(0, 2, false)]);
        assert_eq!(pairs(vec![rot(0, 1024), exp(arena(1024, rows()), 5120), write(1024, 2048)]), [(0, 2, true)]);
        assert_eq!(pairs(vec![rot(0, 1024), write(1024, 2048), exp(arena(1024, rows()), 5120)]), [(0, 1, true)]);
        // Read after being overwritten: another value, not a reader.
        assert_eq!(
            pairs(vec![rot(0, 1024), write(1024, 2048), exp(arena(4096, rows()), 1024), exp(arena(1024, rows()), 5120)]),
            [(0, 1, false)]
        );
        // An entry output in the rotated value's bytes.
        let out = Io { name: "k".into(), operand: arena(1024, rows()) };
        assert!(plan(&entry(vec![rot(0, 1024), write(1024, 2048)], vec![out]), &[rotate_half()])[0].keep);
        let p = &plan(&entry(vec![rot(0, 1024), write(1024, 2048)], vec![]), &[rotate_half()])[0];
        assert_eq!(p.columns[0], (D / 2, true));
        assert_eq!(p.columns[D - 1], (D / 2 - 1, false));
    }

    #[test]
    fn a_step_between_that_the_write_depends_on_keeps_two_launches() {
        // The position is computed between the two.
        let pos = TensorType::new(DType::I64, [1]);
        assert_eq!(pairs(vec![rot(0, 1024), exp(arena(4096, pos), 2048), write(1024, 2048)]), []);
        // A step between reads the cache (attention over the old rows) or writes it.
        assert_eq!(pairs(vec![rot(0, 1024), exp(cache(), 8192), write(1024, 2048)]), []);
        assert_eq!(pairs(vec![rot(0, 1024), write(4096, 2048), write(1024, 2048)]), []);
        // The rotated value is overwritten before the write reads it.
        assert_eq!(pairs(vec![rot(0, 1024), exp(arena(4096, rows()), 1024), write(1024, 2048)]), []);
        // Not a signed permutation, or not f32.
        let mut scaled = rotate_half();
        scaled.values[D / 2] = 2.0;
        assert!(plan(&entry(vec![rot(0, 1024), write(1024, 2048)], vec![]), &[scaled]).is_empty());
        let mut half = rot(0, 1024);
        half.output.ty.dtype = DType::BF16;
        half.inputs[0].ty.dtype = DType::BF16;
        assert_eq!(pairs(vec![half, write(1024, 2048)]), []);
    }
}
