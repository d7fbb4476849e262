//! Dense f32 matrix products on top of the `gemm` crate, with a fused row-panel epilogue.
//!
//! Operands are strided views, so a transposed operand (a PyTorch `Linear` weight stored
//! `[n, k]` used as the k×n right-hand side) costs nothing: `MatView::transposed(w, k, n)`.
//! The output is always a contiguous row-major m×n slice.
//!
//! Threading (measured on the 2-core dev box, see `benches/cpu.rs` and the kernels report):
//! for the transformer shapes (m a few hundred rows, k and n ≥ 768) `gemm`'s own rayon
//! parallelism over the whole product, followed by a parallel epilogue pass over row chunks,
//! beats splitting the rows into one single-threaded `gemm` per thread
//! ([`Strategy::RowPanels`]): `gemm` packs the right-hand side (the weight) into its
//! microkernel layout whatever its strides, and row panels each pack all of it again, which
//! costs more than the epilogue gains from running on cache-hot panels (a bias + GELU pass
//! over C is ~2% of the product at these sizes). Row panels remain the choice for products
//! too small for `gemm` to thread and for single-thread pools, where the epilogue is fused.

use gemm::Parallelism;
use rayon::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Calls into the `gemm` crate now in progress, on any thread. That crate allocates its
/// packing buffers inside every call (it has no API taking caller-owned scratch), so a test
/// proving that kiln's own run path allocates nothing must tell those allocations apart.
static THIRD_PARTY_CALLS: AtomicUsize = AtomicUsize::new(0);

/// Whether some thread is inside a `gemm` crate call (for allocation accounting in tests).
pub fn third_party_gemm_active() -> bool {
    THIRD_PARTY_CALLS.load(Ordering::SeqCst) > 0
}

struct ThirdPartyCall;

impl ThirdPartyCall {
    fn enter() -> Self {
        THIRD_PARTY_CALLS.fetch_add(1, Ordering::SeqCst);
        ThirdPartyCall
    }
}

impl Drop for ThirdPartyCall {
    fn drop(&mut self) {
        THIRD_PARTY_CALLS.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Read-only strided f32 matrix: element (i, j) is `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy, Debug)]
pub struct MatView<'a> {
    /// Backing storage; element (0, 0) is `data[0]`.
    pub data: &'a [f32],
    /// Number of rows.
    pub rows: usize,
    /// Number of columns.
    pub cols: usize,
    /// Distance in elements between consecutive rows.
    pub row_stride: usize,
    /// Distance in elements between consecutive columns.
    pub col_stride: usize,
}

impl<'a> MatView<'a> {
    /// Contiguous row-major `rows × cols` matrix.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols, 1)
    }

    /// `rows × cols` view of a row-major `cols × rows` buffer, i.e. its transpose (no copy).
    pub fn transposed(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, 1, rows)
    }

    /// View with explicit strides (in elements).
    pub fn strided(data: &'a [f32], rows: usize, cols: usize, row_stride: usize, col_stride: usize) -> Self {
        MatView { data, rows, cols, row_stride, col_stride }
    }

    /// The transpose of this view (swaps shape and strides).
    pub fn t(self) -> Self {
        MatView { data: self.data, rows: self.cols, cols: self.rows, row_stride: self.col_stride, col_stride: self.row_stride }
    }

    /// Number of elements of `data` the view reaches (0 for an empty view).
    pub fn span(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            0
        } else {
            (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride + 1
        }
    }

    /// Panics unless every element of the view lies inside `data`: the unchecked `gemm`
    /// calls rely on it, so this is a real assert, not a debug one.
    fn check(&self, what: &str) {
        assert!(
            self.span() <= self.data.len(),
            "gemm: {what} view {}x{} (strides {}, {}) reaches {} elements but has {}",
            self.rows,
            self.cols,
            self.row_stride,
            self.col_stride,
            self.span(),
            self.data.len()
        );
    }
}

/// How a product with an epilogue is spread over rayon's threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// Pick per shape: [`Strategy::GemmParallel`] for large products on a multi-thread pool,
    /// [`Strategy::RowPanels`] otherwise.
    Auto,
    /// Rayon over row panels, one single-threaded `gemm` per panel, epilogue fused per panel.
    RowPanels,
    /// One `gemm` call parallelised internally, then a parallel epilogue pass over row chunks.
    GemmParallel,
}

/// Epilogue callback: `(first_row, panel)` where `panel` is rows `first_row..` of C, whole
/// rows of n elements each, contiguous.
pub type Epilogue<'e> = &'e (dyn Fn(usize, &mut [f32]) + Sync);

/// C = A·B with A m×k, B k×n (any strides) and C contiguous row-major m×n (overwritten).
pub fn matmul(a: MatView, b: MatView, c: &mut [f32]) {
    matmul_with_epilogue_using(Strategy::Auto, a, b, c, &|_, _| {});
}

/// C = A·B, then `epilogue(first_row, panel)` on each row panel right after it is computed.
///
/// Panels are disjoint, cover all m rows, and run concurrently, so the epilogue must only
/// depend on its own rows (bias, activation, residual add of the same rows, …).
pub fn matmul_with_epilogue(a: MatView, b: MatView, c: &mut [f32], epilogue: Epilogue) {
    matmul_with_epilogue_using(Strategy::Auto, a, b, c, epilogue);
}

/// [`matmul_with_epilogue`] with an explicit threading [`Strategy`] (for tuning and benches).
pub fn matmul_with_epilogue_using(strategy: Strategy, a: MatView, b: MatView, c: &mut [f32], epilogue: Epilogue) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "gemm: A is {m}x{k} but B is {}x{n}", b.rows);
    assert_eq!(c.len(), m * n, "gemm: C has {} elements, want {m}x{n}", c.len());
    a.check("A");
    b.check("B");
    if m == 0 || n == 0 {
        return;
    }
    let threads = rayon::current_num_threads();
    let strategy = match strategy {
        Strategy::Auto => auto_strategy(m, k, n, threads),
        s => s,
    };
    match strategy {
        Strategy::RowPanels | Strategy::Auto => {
            let rows = panel_rows(m, threads);
            if rows >= m {
                gemm_rows(a, b, 0, m, c, Parallelism::None);
                epilogue(0, c);
                return;
            }
            c.par_chunks_mut(rows * n).enumerate().for_each(|(p, panel)| {
                let r0 = p * rows;
                gemm_rows(a, b, r0, panel.len() / n, panel, Parallelism::None);
                epilogue(r0, panel);
            });
        }
        Strategy::GemmParallel => {
            gemm_rows(a, b, 0, m, c, Parallelism::Rayon(threads));
            let rows = super::rows_per_chunk(m, n, 1 << 14);
            c.par_chunks_mut(rows * n).enumerate().for_each(|(p, panel)| epilogue(p * rows, panel));
        }
    }
}

/// The threading rule chosen from the measurements in the module docs.
fn auto_strategy(m: usize, k: usize, n: usize, threads: usize) -> Strategy {
    // 2^21 multiply-adds is where `gemm` starts threading internally (its threshold is
    // 48·48·256 per block); below that row panels are the only parallelism available.
    if threads > 1 && m.saturating_mul(k).saturating_mul(n) >= 1 << 21 {
        Strategy::GemmParallel
    } else {
        Strategy::RowPanels
    }
}

/// Rows per panel: one panel per thread, rounded up to a multiple of 16 (gemm's f32 tile
/// height on AVX2/AVX-512) so no panel ends in a ragged microkernel tile.
fn panel_rows(m: usize, threads: usize) -> usize {
    if threads <= 1 {
        return m;
    }
    m.div_ceil(threads).next_multiple_of(16).min(m)
}

/// C[r0..r0+rows] = A[r0..r0+rows]·B via one `gemm` call; `c` holds exactly those rows.
fn gemm_rows(a: MatView, b: MatView, r0: usize, rows: usize, c: &mut [f32], par: Parallelism) {
    let (k, n) = (a.cols, b.cols);
    // Cheap real asserts: the unchecked call below relies on them (callers checked the views).
    assert!(c.len() == rows * n && r0 + rows <= a.rows && b.rows == k, "gemm: panel shape");
    if rows == 0 {
        return;
    }
    if k == 0 {
        c.fill(0.0);
        return;
    }
    let _active = ThirdPartyCall::enter();
    // SAFETY: callers ran `check` on both views, proving every (i, j) of A and B lies
    // inside their slices, and rows
    // r0..r0+rows are rows of A, so A's pointer offset r0*row_stride and all reads stay in
    // bounds; C is `rows × n` contiguous (dst row stride n, col stride 1) and exclusively
    // borrowed. Strides fit in isize because they index existing allocations.
    unsafe {
        gemm::gemm(
            rows,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.data.as_ptr().add(r0 * a.row_stride),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// Batched C[i] = A[i]·B[i] for i in 0..batch, C contiguous `[batch, m, n]`.
///
/// `a` and `b` describe batch 0 and their `data` holds every batch; batch i starts
/// `i * a_batch_stride` (resp. `b_batch_stride`) elements later. A batch stride of 0
/// broadcasts that operand (e.g. one weight shared by every batch).
pub fn batched_matmul(batch: usize, a: MatView, a_batch_stride: usize, b: MatView, b_batch_stride: usize, c: &mut [f32]) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "batched gemm: A is {m}x{k} but B is {}x{n}", b.rows);
    assert_eq!(c.len(), batch * m * n, "batched gemm: C has {} elements, want {batch}x{m}x{n}", c.len());
    if batch == 0 || m == 0 || n == 0 {
        return;
    }
    let last = |v: &MatView, stride: usize| (batch - 1) * stride + v.span();
    assert!(last(&a, a_batch_stride) <= a.data.len(), "batched gemm: A's batches overrun its data");
    assert!(last(&b, b_batch_stride) <= b.data.len(), "batched gemm: B's batches overrun its data");
    fn view(v: MatView<'_>, stride: usize, i: usize) -> MatView<'_> {
        MatView { data: &v.data[i * stride..], ..v }
    }
    let threads = rayon::current_num_threads();
    if batch >= threads {
        // Enough independent products to keep every thread busy without splitting any.
        c.par_chunks_mut(m * n).enumerate().for_each(|(i, ci)| {
            gemm_rows(view(a, a_batch_stride, i), view(b, b_batch_stride, i), 0, m, ci, Parallelism::None);
        });
    } else {
        for (i, ci) in c.chunks_mut(m * n).enumerate() {
            matmul(view(a, a_batch_stride, i), view(b, b_batch_stride, i), ci);
        }
    }
}

/// Single-threaded C += beta·A·B (or C = beta·A·B when `accumulate` is false) on an m×n
/// window of `c` with row stride `c_row_stride`; the building block for kernels that tile
/// their own work.
pub(crate) fn gemm_serial(a: MatView, b: MatView, c: &mut [f32], c_row_stride: usize, accumulate: bool, beta: f32) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    // Real asserts (O(1) next to the product): the unchecked call below relies on them.
    assert_eq!(b.rows, k, "gemm: A is {m}x{k} but B is {}x{n}", b.rows);
    a.check("A");
    b.check("B");
    if m == 0 || n == 0 {
        return;
    }
    assert!(n <= c_row_stride && (m - 1) * c_row_stride + n <= c.len(), "gemm: C too small");
    if k == 0 {
        if !accumulate {
            c.chunks_mut(c_row_stride).take(m).for_each(|row| row[..n].fill(0.0));
        }
        return;
    }
    let _active = ThirdPartyCall::enter();
    // SAFETY: the asserts above prove every element of A, B and the m×n window of C (row
    // stride c_row_stride ≥ n, so rows do not overlap) lies inside its slice; C is borrowed
    // mutably, A and B shared.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            c_row_stride as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            beta,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::{assert_close, Rng};

    fn naive(a: MatView, b: MatView) -> Vec<f64> {
        let mut c = vec![0.0f64; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                let mut s = 0.0f64;
                for p in 0..a.cols {
                    s += f64::from(a.data[i * a.row_stride + p * a.col_stride]) * f64::from(b.data[p * b.row_stride + j * b.col_stride]);
                }
                c[i * b.cols + j] = s;
            }
        }
        c
    }

    #[test]
    fn matmul_all_layouts_and_strategies() {
        let mut rng = Rng::new(1);
        for &(m, k, n) in &[(1, 1, 1), (3, 5, 7), (37, 19, 23), (96, 64, 40), (130, 33, 70), (5, 0, 4)] {
            let ad = rng.vec(m * k, -1.0, 1.0);
            let bd = rng.vec(k * n, -1.0, 1.0);
            for a in [MatView::row_major(&ad, m, k), MatView::transposed(&ad, m, k)] {
                for b in [MatView::row_major(&bd, k, n), MatView::transposed(&bd, k, n)] {
                    let want = naive(a, b);
                    for s in [Strategy::Auto, Strategy::RowPanels, Strategy::GemmParallel] {
                        let mut c = vec![f32::NAN; m * n];
                        matmul_with_epilogue_using(s, a, b, &mut c, &|_, _| {});
                        assert_close(&format!("{m}x{k}x{n} {s:?}"), &c, &want, 1e-5 * (k as f64).sqrt().max(1.0));
                    }
                }
            }
        }
    }

    #[test]
    fn strided_submatrix_view() {
        // A 4x3 window with row stride 10 and column stride 2 inside a bigger buffer.
        let mut rng = Rng::new(2);
        let ad = rng.vec(40, -1.0, 1.0);
        let bd = rng.vec(3 * 5, -1.0, 1.0);
        let a = MatView::strided(&ad, 4, 3, 10, 2);
        let b = MatView::row_major(&bd, 3, 5);
        let mut c = vec![0.0; 20];
        matmul(a, b, &mut c);
        assert_close("strided", &c, &naive(a, b), 1e-6);
        assert_close(
            "t().t()",
            &{
                let mut c2 = vec![0.0; 20];
                matmul(a.t().t(), b, &mut c2);
                c2
            },
            &naive(a, b),
            1e-6,
        );
    }

    #[test]
    fn epilogue_sees_every_row_once_with_right_offsets() {
        // Pool sizes change the panel split and the Auto choice.
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("test pool");
            pool.install(epilogue_case);
        }
    }

    fn epilogue_case() {
        let mut rng = Rng::new(3);
        let (m, k, n) = (200, 48, 30);
        let ad = rng.vec(m * k, -1.0, 1.0);
        let bd = rng.vec(n * k, -1.0, 1.0); // Linear weight layout [n, k]
        let bias = rng.vec(n, -1.0, 1.0);
        let a = MatView::row_major(&ad, m, k);
        let b = MatView::transposed(&bd, k, n);
        let base = naive(a, b);
        let want: Vec<f64> = base.iter().enumerate().map(|(idx, v)| (v + f64::from(bias[idx % n])).max(0.0) + (idx / n) as f64).collect();
        for s in [Strategy::Auto, Strategy::RowPanels, Strategy::GemmParallel] {
            let mut c = vec![0.0; m * n];
            matmul_with_epilogue_using(s, a, b, &mut c, &|r0, panel| {
                assert_eq!(panel.len() % n, 0);
                for (r, row) in panel.chunks_mut(n).enumerate() {
                    for (x, &bb) in row.iter_mut().zip(&bias) {
                        *x = (*x + bb).max(0.0) + (r0 + r) as f32;
                    }
                }
            });
            assert_close(&format!("epilogue {s:?}"), &c, &want, 1e-5);
        }
    }

    #[test]
    fn batched_with_broadcast_and_transposed_b() {
        let mut rng = Rng::new(4);
        let (m, k, n) = (7, 9, 6);
        let ad = rng.vec(5 * m * k, -1.0, 1.0);
        let bd = rng.vec(5 * n * k, -1.0, 1.0);
        // batch 1 takes the one-product-at-a-time path, batch 5 the parallel-over-batch one.
        for (batch, bs_b, bt) in [(5, n * k, false), (5, n * k, true), (5, 0, false), (1, n * k, true)] {
            let a = MatView::row_major(&ad, m, k);
            let b = if bt { MatView::transposed(&bd, k, n) } else { MatView::row_major(&bd, k, n) };
            let mut c = vec![0.0; batch * m * n];
            batched_matmul(batch, a, m * k, b, bs_b, &mut c);
            let mut want = Vec::new();
            for i in 0..batch {
                let ai = MatView { data: &ad[i * m * k..], ..a };
                let bi = MatView { data: &bd[i * bs_b..], ..b };
                want.extend(naive(ai, bi));
            }
            assert_close("batched", &c, &want, 1e-6);
        }
    }

    #[test]
    #[should_panic(expected = "reaches")]
    fn out_of_bounds_view_panics() {
        let d = vec![0.0; 5];
        let mut c = vec![0.0; 4];
        matmul(MatView::row_major(&d, 2, 3), MatView::row_major(&d, 3, 2), &mut c);
    }

    #[test]
    fn gemm_serial_accumulates_into_strided_c() {
        let mut rng = Rng::new(5);
        let (m, k, n, ldc) = (6, 4, 3, 5);
        let ad = rng.vec(m * k, -1.0, 1.0);
        let bd = rng.vec(k * n, -1.0, 1.0);
        let a = MatView::row_major(&ad, m, k);
        let b = MatView::row_major(&bd, k, n);
        let mut c = vec![1.0f32; (m - 1) * ldc + n];
        gemm_serial(a, b, &mut c, ldc, true, 0.5);
        let p = naive(a, b);
        for i in 0..m {
            for j in 0..n {
                let want = 1.0 + 0.5 * p[i * n + j];
                assert!((f64::from(c[i * ldc + j]) - want).abs() < 1e-6);
            }
            for j in n..ldc.min(c.len() - i * ldc) {
                assert_eq!(c[i * ldc + j], 1.0, "gap column touched");
            }
        }
    }
}
