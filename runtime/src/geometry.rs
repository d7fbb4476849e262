//! The index math of a step, computed once for every backend's lowering: an axis split into
//! `[outer, len, inner]`, contiguous and broadcast strides, the strided read of a permute or
//! slice, where each input of a concat lands, the kept and reduced axes of a reduction, the
//! batch broadcasting of a matmul, the row view of the norms and the dimensions of
//! attention. The cube and cuda lowerings (and the cpu executor's axis splits) read these
//! structs; each backend only packs them into its own parameter blocks.

use kiln_graph::dtype::broadcast_strides;

/// A shape seen as `[outer, len, inner]` around one axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Split {
    /// The product of the axes before.
    pub outer: usize,
    /// The axis' extent.
    pub len: usize,
    /// The product of the axes after (the axis' stride in a contiguous tensor).
    pub inner: usize,
}

impl Split {
    /// `shape` split at `axis`.
    pub fn at(shape: &[usize], axis: usize) -> Split {
        Split { outer: shape[..axis].iter().product(), len: shape[axis], inner: shape[axis + 1..].iter().product() }
    }

    /// The lines along the axis (`outer * inner`).
    pub fn lines(&self) -> usize {
        self.outer * self.inner
    }
}

/// Row-major strides of a contiguous tensor of `shape`.
pub fn contiguous(shape: &[usize]) -> Vec<usize> {
    let mut st = vec![1; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        st[d] = st[d + 1] * shape[d + 1];
    }
    st
}

/// A shape as the kernels index it: a scalar is `[1]`.
pub fn at_least_1d(shape: &[usize]) -> Vec<usize> {
    if shape.is_empty() {
        vec![1]
    } else {
        shape.to_vec()
    }
}

/// How an elementwise kernel reads one input for output element `x`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    /// One element, broadcast.
    Scalar,
    /// Same shape as the output, contiguous: element `x`.
    Contiguous,
    /// Broadcast or strided: these strides over the output's axes (0 where it broadcasts).
    Strided(Vec<usize>),
}

/// An elementwise step (a fused region, a broadcast, a matmul epilogue): the output shape
/// (at least 1-D) and every input's strides over it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElementwiseGeometry {
    pub shape: Vec<usize>,
    /// Per input: its strides broadcast to `shape`.
    pub strides: Vec<Vec<usize>>,
    /// Per input: how a kernel that special-cases scalars and same-shape inputs reads it.
    pub access: Vec<Access>,
}

impl ElementwiseGeometry {
    /// The inputs of `ins` shapes broadcast to `out`.
    pub fn new(ins: &[&[usize]], out: &[usize]) -> ElementwiseGeometry {
        let shape = at_least_1d(out);
        // A one-element input reads element 0 whatever its rank.
        let strides: Vec<Vec<usize>> = ins
            .iter()
            .map(|s| if s.iter().product::<usize>() == 1 { vec![0; shape.len()] } else { broadcast_strides(s, &shape) })
            .collect();
        let access = ins
            .iter()
            .zip(&strides)
            .map(|(s, st)| {
                if s.iter().product::<usize>() == 1 {
                    Access::Scalar
                } else if *s == shape.as_slice() {
                    Access::Contiguous
                } else {
                    Access::Strided(st.clone())
                }
            })
            .collect();
        ElementwiseGeometry { shape, strides, access }
    }

    /// Output elements.
    pub fn n(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The strided read a permute or a slice makes of its input to fill its contiguous output:
/// output element at position `p` (over the output's shape) is input element
/// `skip + sum p[a] * strides[a]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ViewGeometry {
    pub skip: usize,
    pub strides: Vec<usize>,
}

impl ViewGeometry {
    /// `perm` of an input of `shape` (output axis `a` is input axis `perm[a]`).
    pub fn permute(shape: &[usize], perm: &[usize]) -> ViewGeometry {
        let st = contiguous(shape);
        ViewGeometry { skip: 0, strides: perm.iter().map(|&p| st[p]).collect() }
    }

    /// Every `step`-th element from `start` along `axis` of an input of `shape`.
    pub fn slice(shape: &[usize], axis: usize, start: usize, step: usize) -> ViewGeometry {
        let mut strides = contiguous(shape);
        let skip = start * strides[axis];
        strides[axis] *= step;
        ViewGeometry { skip, strides }
    }
}

/// A concat: the output's contiguous strides and where each input starts in it (elements).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConcatGeometry {
    pub dst_strides: Vec<usize>,
    pub starts: Vec<usize>,
}

impl ConcatGeometry {
    /// Inputs of `ins` shapes (at least 1-D) joined along `axis` into `out`.
    pub fn new(ins: &[Vec<usize>], out: &[usize], axis: usize) -> ConcatGeometry {
        let dst_strides = contiguous(out);
        let mut at = 0;
        let starts = ins
            .iter()
            .map(|s| {
                let start = at * dst_strides[axis];
                at += s[axis];
                start
            })
            .collect();
        ConcatGeometry { dst_strides, starts }
    }
}

/// One axis of a reduction's input: its extent and contiguous stride.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Axis {
    pub len: usize,
    pub stride: usize,
}

/// A reduction of a contiguous input over `axes`: the kept axes (which index the output) and
/// the reduced ones, in input order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReduceGeometry {
    pub kept: Vec<Axis>,
    pub reduced: Vec<Axis>,
}

impl ReduceGeometry {
    /// An input of `shape` reduced over `axes`.
    pub fn new(shape: &[usize], axes: &[usize]) -> ReduceGeometry {
        let st = contiguous(shape);
        let (mut kept, mut reduced) = (vec![], vec![]);
        for (a, (&len, &stride)) in shape.iter().zip(&st).enumerate() {
            let list = if axes.contains(&a) { &mut reduced } else { &mut kept };
            list.push(Axis { len, stride });
        }
        ReduceGeometry { kept, reduced }
    }

    /// Output elements.
    pub fn n_out(&self) -> usize {
        self.kept.iter().map(|a| a.len).product()
    }

    /// Elements folded into each output element.
    pub fn n_reduced(&self) -> usize {
        self.reduced.iter().map(|a| a.len).product()
    }
}

/// A batched matmul `[.., m, k] @ [.., k, n]` (or `[.., n, k]` transposed) into `[batch..,
/// m, n]`, the operands' batch axes broadcasting to the output's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MatmulGeometry {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// The output's batch axes and their product.
    pub batch_shape: Vec<usize>,
    pub batch: usize,
    /// Per operand (a, b): its batch extent (the product of its own batch axes).
    pub lead: [usize; 2],
    /// Per operand: its matrix size and the element stride of its matrices along each of the
    /// output's batch axes (0 where it broadcasts).
    pub mat: [usize; 2],
    pub batch_strides: [Vec<usize>; 2],
}

impl MatmulGeometry {
    /// `a` and `b` multiplied into `out` (shapes of rank at least 2).
    pub fn new(a: &[usize], b: &[usize], out: &[usize]) -> MatmulGeometry {
        let r = out.len();
        let (m, n, k) = (out[r - 2], out[r - 1], a[a.len() - 1]);
        let batch_shape = out[..r - 2].to_vec();
        let lead = |t: &[usize]| t[..t.len() - 2].iter().product::<usize>();
        let mat = [m * k, k * n];
        let strides = |t: &[usize], mat: usize| broadcast_strides(&t[..t.len() - 2], &batch_shape).into_iter().map(|s| s * mat).collect();
        MatmulGeometry {
            m,
            n,
            k,
            batch: batch_shape.iter().product(),
            lead: [lead(a), lead(b)],
            mat,
            batch_strides: [strides(a, mat[0]), strides(b, mat[1])],
            batch_shape,
        }
    }

    /// The output matrices a launch computes: the batch, or 0 for an empty output.
    pub fn matrices(&self) -> usize {
        if self.m * self.n == 0 {
            0
        } else {
            self.batch
        }
    }

    /// The operands (0: a, 1: b) whose batch axes broadcast partially: neither all of the
    /// output's batch nor none of it.
    pub fn partial(&self) -> Vec<usize> {
        (0..2).filter(|&i| ![1, self.batch].contains(&self.lead[i])).collect()
    }
}

/// A row-wise op over the last axis (norms, last-axis softmax): `rows` rows of `d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowGeometry {
    pub rows: usize,
    pub d: usize,
}

impl RowGeometry {
    /// The rows of a tensor of `shape`.
    pub fn new(shape: &[usize]) -> RowGeometry {
        let d = *shape.last().unwrap_or(&1);
        RowGeometry { rows: shape.iter().product::<usize>() / d.max(1), d }
    }
}

/// Attention over q `[batch, sq, hq, d]`, k `[batch, sk, hkv, d]`, v `[batch, sk, hkv, dv]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionGeometry {
    pub batch: usize,
    pub sq: usize,
    pub hq: usize,
    pub d: usize,
    pub sk: usize,
    pub hkv: usize,
    pub dv: usize,
}

impl AttentionGeometry {
    /// The dimensions of q, k and v.
    pub fn new(q: &[usize], k: &[usize], v: &[usize]) -> AttentionGeometry {
        AttentionGeometry { batch: q[0], sq: q[1], hq: q[2], d: q[3], sk: k[1], hkv: k[2], dv: v[3] }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_and_strides() {
        assert_eq!(Split::at(&[2, 3, 4, 5], 2), Split { outer: 6, len: 4, inner: 5 });
        assert_eq!(Split::at(&[7], 0).lines(), 1);
        assert_eq!(contiguous(&[2, 3, 4]), [12, 4, 1]);
        assert_eq!(ViewGeometry::permute(&[2, 3, 4], &[2, 0, 1]).strides, [1, 12, 4]);
        assert_eq!(ViewGeometry::slice(&[4, 6], 1, 1, 2), ViewGeometry { skip: 1, strides: vec![6, 2] });
        let c = ConcatGeometry::new(&[vec![2, 3], vec![2, 5]], &[2, 8], 1);
        assert_eq!((c.dst_strides, c.starts), (vec![8, 1], vec![0, 3]));
    }

    #[test]
    fn elementwise_inputs_are_scalar_contiguous_or_strided() {
        let g = ElementwiseGeometry::new(&[&[], &[2, 3], &[3], &[2, 1]], &[2, 3]);
        assert_eq!(g.n(), 6);
        assert_eq!(g.access[..2], [Access::Scalar, Access::Contiguous]);
        assert_eq!(g.access[2], Access::Strided(vec![0, 1]));
        assert_eq!(g.access[3], Access::Strided(vec![1, 0]));
        assert_eq!(g.strides[0], [0, 0]);
        assert_eq!(ElementwiseGeometry::new(&[&[]], &[]).shape, [1]);
    }

    #[test]
    fn reduce_keeps_and_folds_axes_in_order() {
        let g = ReduceGeometry::new(&[2, 3, 4], &[0, 2]);
        assert_eq!(g.kept, [Axis { len: 3, stride: 4 }]);
        assert_eq!(g.reduced, [Axis { len: 2, stride: 12 }, Axis { len: 4, stride: 1 }]);
        assert_eq!((g.n_out(), g.n_reduced()), (3, 8));
    }

    #[test]
    fn matmul_batch_broadcasting() {
        let g = MatmulGeometry::new(&[2, 1, 5, 7], &[3, 7, 4], &[2, 3, 5, 4]);
        assert_eq!((g.m, g.n, g.k, g.batch, g.lead), (5, 4, 7, 6, [2, 3]));
        assert_eq!(g.batch_strides, [vec![35, 0], vec![0, 28]]);
        assert_eq!(g.partial(), [0, 1]);
        let shared = MatmulGeometry::new(&[3, 5, 7], &[7, 4], &[3, 5, 4]);
        assert_eq!((shared.lead, shared.partial(), shared.matrices()), ([3, 1], vec![], 3));
        assert_eq!(MatmulGeometry::new(&[2, 0, 7], &[2, 7, 4], &[2, 0, 4]).matrices(), 0);
        assert_eq!(RowGeometry::new(&[2, 3, 8]), RowGeometry { rows: 6, d: 8 });
    }
}
