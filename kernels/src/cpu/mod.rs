//! Multi-threaded f32 CPU kernels.
//!
//! Every kernel runs on rayon's global pool; set its size with
//! `rayon::ThreadPoolBuilder::build_global` or run inside `ThreadPool::install`.
//! Hand-written loops are compiled twice (baseline and AVX2+FMA) and picked at run time,
//! see [`simd`].

pub mod attention;
pub mod conv;
pub mod elementwise;
pub mod gemm;
pub mod index;
pub mod movement;
pub mod norm;
pub mod reduce;
pub mod resize;
pub mod sgemm512;
pub mod simd;
pub mod softmax;

#[cfg(test)]
mod testutil;

/// Raw pointer that may cross threads; users promise disjoint writes.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr<T>(pub(crate) *mut T);

// SAFETY: a SyncPtr is only dereferenced by tasks that write disjoint elements, which each
// user documents at the dereference site.
unsafe impl<T: Send> Send for SyncPtr<T> {}
// SAFETY: as above; shared access never writes the same element from two threads.
unsafe impl<T: Send> Sync for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper, not its field).
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

/// Applies `f(x_row, out_row)` to every row of `rows x d` buffers, rows split into parallel
/// chunks of at least `min_elems` elements, each chunk run with AVX2+FMA when available:
/// the driver the row kernels (norms, softmax) share.
pub(crate) fn for_each_row(x: &[f32], out: &mut [f32], rows: usize, d: usize, min_elems: usize, f: impl Fn(&[f32], &mut [f32]) + Sync) {
    use rayon::prelude::*;
    debug_assert_eq!(x.len(), rows * d);
    debug_assert_eq!(out.len(), rows * d);
    if rows == 0 || d == 0 {
        return;
    }
    let chunk = rows_per_chunk(rows, d, min_elems) * d;
    out.par_chunks_mut(chunk).zip(x.par_chunks(chunk)).for_each(|(o, x)| {
        simd::vectorized(
            #[inline(always)]
            || {
                for (orow, xrow) in o.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                    f(xrow, orow);
                }
            },
        )
    });
}

/// Rows per parallel chunk so that each chunk holds at least `min_elems` elements.
pub(crate) fn rows_per_chunk(rows: usize, row_len: usize, min_elems: usize) -> usize {
    let by_size = min_elems.div_ceil(row_len.max(1));
    // At least 4 chunks per thread when the work allows it, for load balance.
    let by_threads = rows.div_ceil(4 * rayon::current_num_threads());
    by_size.max(by_threads).clamp(1, rows.max(1))
}
