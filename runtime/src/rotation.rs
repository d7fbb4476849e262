//! RoPE's rotation GEMM (`x @ P`, `P` a constant signed permutation made by
//! `kiln_graph::passes::rotation_as_matmul`) read as what it is:
//! `out[.., i] = sign_i * x[.., perm_i]`. The product has one nonzero term per element, so
//! reading that term is exact. The cuda backend runs such a step as one elementwise kernel
//! (`cuda::rotation`), and the cpu backend computes it inside the KV-cache write that stores
//! it (`cpu::rotary`). The permutation is kept as a few runs of columns (RoPE's rotate_half has
//! two).

use kiln_graph::program::{ConstData, Slot, Step};
use kiln_graph::Op;

/// Most runs a permutation may have to be read this way (each is a branch in the kernel).
pub const MAX_RUNS: usize = 8;

/// Output columns `dst..dst + len` read the source columns `src..src + len`, negated or not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Run {
    pub dst: usize,
    pub len: usize,
    pub src: usize,
    pub neg: bool,
}

/// A signed permutation of `d` columns: every output column is one input column times ±1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedPerm {
    pub d: usize,
    pub runs: Vec<Run>,
}

impl SignedPerm {
    /// The source column and whether it is negated, for output column `c`.
    pub fn source_of(&self, c: usize) -> Option<(usize, bool)> {
        self.runs.iter().find(|r| (r.dst..r.dst + r.len).contains(&c)).map(|r| (r.src + c - r.dst, r.neg))
    }

    /// `(source column, negated)` for every output column in order.
    pub fn columns(&self) -> Option<Vec<(usize, bool)>> {
        (0..self.d).map(|c| self.source_of(c)).collect()
    }
}

/// The signed permutation a constant `[d, d]` matrix holds (`P[src, dst]`, row-major), if it
/// is one: each column exactly one nonzero, +1 or -1, each row used once, in at most
/// [`MAX_RUNS`] runs.
pub fn signed_permutation(c: &ConstData) -> Option<SignedPerm> {
    let [rows, d] = c.ty.shape[..] else { return None };
    if rows != d || d == 0 || !c.ty.dtype.is_float() || c.values.len() != d * d {
        return None;
    }
    let mut used = vec![false; d];
    let mut runs: Vec<Run> = Vec::new();
    for dst in 0..d {
        let mut nonzero = (0..d).filter(|&src| c.values[src * d + dst] != 0.0);
        let (Some(src), None) = (nonzero.next(), nonzero.next()) else { return None };
        let v = c.values[src * d + dst];
        if (v != 1.0 && v != -1.0) || std::mem::replace(&mut used[src], true) {
            return None;
        }
        let neg = v < 0.0;
        match runs.last_mut() {
            Some(r) if r.neg == neg && r.src + r.len == src && r.dst + r.len == dst => r.len += 1,
            _ => runs.push(Run { dst, len: 1, src, neg }),
        }
    }
    (runs.len() <= MAX_RUNS).then_some(SignedPerm { d, runs })
}

/// The signed permutation of every constant of a program (`None` where it holds none).
pub fn of_constants(constants: &[ConstData]) -> Vec<Option<SignedPerm>> {
    constants.iter().map(signed_permutation).collect()
}

/// The permutation a matmul step reads as its right operand, where the step can run as one
/// elementwise kernel: `x @ P` with `P` a constant signed permutation, `x` of the output's
/// shape (no batch broadcast) and a float dtype.
pub fn of_step<'a>(s: &Step, perms: &'a [Option<SignedPerm>]) -> Option<&'a SignedPerm> {
    let Op::MatMul { transpose_b: false, .. } = s.op else { return None };
    let Slot::Const(i) = s.inputs.get(1)?.slot else { return None };
    let perm = perms.get(i as usize)?.as_ref()?;
    let (x, out) = (&s.inputs[0].ty, &s.output.ty);
    (x.shape == out.shape && x.dtype == out.dtype && out.dtype.is_float() && out.shape.last() == Some(&perm.d)).then_some(perm)
}
