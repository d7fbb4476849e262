//! [`Program::validate`]: what every backend checks at load before it trusts a program, whoever
//! wrote it (an artifact's checksum proves only that the bytes arrived as written). Every size
//! is computed with overflow checks; every slot lies inside what it indexes (arena, weights,
//! constants, states) and agrees with its declared type; every step's output type is inferred
//! again from its inputs with the compiler's own rules ([`crate::infer::infer`]). Reading an
//! artifact checks the layout; every session checks everything at load, on every backend,
//! whether the program came from a file or from memory. A program that fails is refused with the
//! entry and step named, before any memory is allocated for it.

use crate::dtype::TensorType;
use crate::infer::infer;
use crate::op::Op;
use crate::program::{Entry, Operand, Program, Slot, ALIGN};

/// A tensor's size in bytes, or `None` when it does not fit a `usize`.
pub fn checked_bytes(ty: &TensorType) -> Option<usize> {
    ty.shape.iter().try_fold(ty.dtype.size(), |n, &d| n.checked_mul(d))
}

impl Program {
    /// Checks the program's internal consistency (see the module docs): its layout
    /// ([`Program::validate_layout`]), then every step's output type re-inferred from its inputs.
    /// The error names the entry and step at fault.
    pub fn validate(&self) -> Result<(), String> {
        self.validate_layout()?;
        for e in &self.entries {
            for (i, s) in e.steps.iter().enumerate() {
                let at = |m: String| format!("entry '{}', step {i} (%{} {}): {m}", e.name, s.node, s.op.name());
                if matches!(s.output.slot, Slot::Weight(_) | Slot::Const(_)) {
                    return Err(at("writes a weight or a constant".into()));
                }
                let types: Vec<&TensorType> = s.inputs.iter().map(|o| &o.ty).collect();
                let sources = matches!(s.op, Op::Input { .. } | Op::Weight { .. } | Op::Constant { .. } | Op::Iota { .. });
                let want = infer(&s.op, &types, sources.then_some(&s.output.ty)).map_err(at)?;
                if want != s.output.ty {
                    return Err(at(format!("its inputs give {want}, the step declares {}", s.output.ty)));
                }
            }
        }
        Ok(())
    }

    /// The layout alone, what reading an artifact checks: every size computable without
    /// overflow, constants holding their values, every operand's slot inside the arena, weight,
    /// constant or state it names and of its size.
    pub fn validate_layout(&self) -> Result<(), String> {
        for (i, w) in self.weights.iter().enumerate() {
            checked_bytes(&w.ty).ok_or_else(|| format!("weight {i} '{}' ({}) overflows the address space", w.name, w.ty))?;
        }
        for (i, c) in self.constants.iter().enumerate() {
            let n = checked_bytes(&c.ty).ok_or_else(|| format!("constant {i} ({}) overflows the address space", c.ty))?;
            if c.values.len().checked_mul(c.ty.dtype.size()) != Some(n) {
                return Err(format!("constant {i} has {} values for {}", c.values.len(), c.ty));
            }
        }
        let mut states = 0usize;
        for (i, s) in self.states.iter().enumerate() {
            let n = checked_bytes(&s.ty).ok_or_else(|| format!("state {i} '{}' ({}) overflows the address space", s.name, s.ty))?;
            states = states.checked_add(n).ok_or("the states together overflow the address space")?;
        }
        for e in &self.entries {
            for io in e.inputs.iter().chain(&e.outputs) {
                self.operand(e, &io.operand).map_err(|m| format!("entry '{}', '{}': {m}", e.name, io.name))?;
            }
            for (k, s) in e.steps.iter().enumerate() {
                for o in s.inputs.iter().chain([&s.output]) {
                    self.operand(e, o).map_err(|m| format!("entry '{}', step {k} (%{} {}): {m}", e.name, s.node, s.op.name()))?;
                }
            }
        }
        Ok(())
    }

    /// One operand: its slot in range and holding as many elements of its dtype as its type
    /// (an operand may view a weight, constant or state in another shape of the same size: a
    /// reshape folded into the read).
    fn operand(&self, e: &Entry, o: &Operand) -> Result<(), String> {
        let n = checked_bytes(&o.ty).ok_or_else(|| format!("{} overflows the address space", o.ty))?;
        let same = |ty: &TensorType| ty.dtype == o.ty.dtype && checked_bytes(ty) == Some(n);
        match o.slot {
            Slot::Arena { offset, bytes } => {
                if offset % ALIGN != 0 {
                    return Err(format!("arena offset {offset} is not a multiple of {ALIGN}"));
                }
                if bytes != n {
                    return Err(format!("an arena range of {bytes} bytes holds {}", o.ty));
                }
                if offset.checked_add(bytes).is_none_or(|end| end > e.arena_bytes) {
                    return Err(format!("bytes {offset}+{bytes} lie outside the {}-byte arena", e.arena_bytes));
                }
            }
            Slot::Weight(i) => match self.weights.get(i as usize) {
                Some(w) if same(&w.ty) => {}
                Some(w) => return Err(format!("weight '{}' is {}, read as {}", w.name, w.ty, o.ty)),
                None => return Err(format!("weight {i} does not exist (the program has {})", self.weights.len())),
            },
            Slot::Const(i) => match self.constants.get(i as usize) {
                Some(c) if same(&c.ty) => {}
                Some(c) => return Err(format!("constant {i} is {}, read as {}", c.ty, o.ty)),
                None => return Err(format!("constant {i} does not exist (the program has {})", self.constants.len())),
            },
            Slot::State(i) => match self.states.get(i as usize) {
                Some(st) if same(&st.ty) => {}
                Some(st) => return Err(format!("state '{}' is {}, read as {}", st.name, st.ty, o.ty)),
                None => return Err(format!("state {i} does not exist (the program has {})", self.states.len())),
            },
        }
        Ok(())
    }
}
