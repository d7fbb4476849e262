//! An AVX-512 f32 GEMM for products against a weight packed once at load time.
//!
//! The `gemm` crate (the default path) uses AVX-512 only with a nightly feature, and
//! repacks the right-hand side on every call. Transformer inference multiplies fresh
//! activations by the same weights every run, so this path packs each weight once into
//! 32-column panels and runs a 12x32 register-blocked micro-kernel over row-major
//! activations (no packing of A, no allocation per call). A bf16 checkpoint's weight keeps
//! its bf16 bits in the panels (half the memory and half the bytes a decode step reads) and is
//! widened exactly when used. Used when the CPU has AVX-512F; everything else keeps the
//! `gemm` crate path.

use super::gemm::MatView;
use super::SyncPtr;
use rayon::prelude::*;

/// Columns per packed panel (two 16-lane registers).
const NR: usize = 32;
/// Rows per micro-tile (12 x 2 accumulators + 2 B registers + 1 broadcast fit in 32 zmm).
const MR: usize = 12;
/// Depth of one pass over a panel: a 32 x 1152 panel (144 KiB) stays in L2 while every row
/// tile of A streams past it, and C is read back only every 1152 steps of k. Measured on
/// So400m (6 interleaved A/B runs): faster than 256 (an L1-sized panel) in each pair.
const KC: usize = 1152;

/// Whether this CPU runs the AVX-512 path.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The version of the packed layout below (panel width, element order, padding). A prepared
/// weight file records it, so panels written by another layout are refused, not misread.
pub const LAYOUT: &str = "sgemm512 panels [n/32][k][32] zero-padded, f32 or bf16 bits, v1";

/// Bytes owned elsewhere that hold packed panels (a mapped prepared weight file): the panels
/// are read in place, never copied.
pub trait PanelBytes: Send + Sync + std::fmt::Debug {
    /// The whole buffer; the panels lie at the offset given to [`PackedB::from_bytes`].
    fn bytes(&self) -> &[u8];
}

/// A k x n right-hand side packed into panels `[n / 32][k][32]` (the last panel zero-padded).
#[derive(Clone, Debug)]
pub struct PackedB {
    /// Rows (the contraction length).
    pub k: usize,
    /// Columns.
    pub n: usize,
    data: Panels,
}

/// The panels' elements: f32, or the bf16 bits of a bf16 checkpoint. bf16 panels hold half
/// the bytes (half the memory, and half the traffic of a memory-bound decode step); each
/// 1152 x 32 slice is widened to f32 (exactly: a shift) into a per-thread buffer before the
/// micro-kernel runs over it, so the products are the same as with f32 panels.
#[derive(Clone, Debug)]
enum Panels {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
    /// Panels read in place from `owner.bytes()[start..start + len]` (checked at construction:
    /// in bounds and 64-byte aligned), f32 or (`bf16`) bf16 bits.
    Borrowed {
        owner: std::sync::Arc<dyn PanelBytes>,
        start: usize,
        len: usize,
        bf16: bool,
    },
}

/// The panels' elements as a slice, wherever they live.
enum PanelSlice<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

impl Panels {
    fn slice(&self) -> PanelSlice<'_> {
        match self {
            Panels::F32(d) => PanelSlice::F32(d),
            Panels::Bf16(d) => PanelSlice::Bf16(d),
            Panels::Borrowed { owner, start, len, bf16 } => {
                let b = &owner.bytes()[*start..*start + *len];
                // Alignment and length were checked in `from_bytes`, so the casts cannot fail.
                match bf16 {
                    true => PanelSlice::Bf16(bytemuck::cast_slice(b)),
                    false => PanelSlice::F32(bytemuck::cast_slice(b)),
                }
            }
        }
    }
}

/// Float elements as a checkpoint stores them (little-endian bytes), read as f32: exact for
/// each dtype, so packing from them equals packing their f32 conversion.
#[derive(Clone, Copy, Debug)]
pub enum Stored<'a> {
    /// f32, 4 bytes each.
    F32(&'a [u8]),
    /// bf16, 2 bytes each.
    Bf16(&'a [u8]),
    /// f16, 2 bytes each.
    F16(&'a [u8]),
}

impl Stored<'_> {
    /// Element `i` as f32.
    #[inline(always)]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            Stored::F32(b) => f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]),
            Stored::Bf16(b) => f32::from_bits((u16::from_le_bytes([b[2 * i], b[2 * i + 1]]) as u32) << 16),
            Stored::F16(b) => half::f16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32(),
        }
    }

    /// Elements held.
    pub fn len(&self) -> usize {
        match self {
            Stored::F32(b) => b.len() / 4,
            Stored::Bf16(b) | Stored::F16(b) => b.len() / 2,
        }
    }

    /// Whether it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Elements `start..start + len`.
    pub fn slice(&self, start: usize, len: usize) -> Self {
        match *self {
            Stored::F32(b) => Stored::F32(&b[4 * start..4 * (start + len)]),
            Stored::Bf16(b) => Stored::Bf16(&b[2 * start..2 * (start + len)]),
            Stored::F16(b) => Stored::F16(&b[2 * start..2 * (start + len)]),
        }
    }
}

impl PackedB {
    /// Packs any strided k x n view (a PyTorch `[n, k]` weight is `MatView::transposed`).
    pub fn pack(b: MatView) -> Self {
        let data = pack_with(b.rows, b.cols, |kk, col| b.data[kk * b.row_stride + col * b.col_stride]);
        PackedB { k: b.rows, n: b.cols, data: Panels::F32(data) }
    }

    /// Bytes the panels hold.
    pub fn bytes(&self) -> usize {
        self.raw().0.len()
    }

    /// The panels' bytes as they lie in memory (little-endian), and whether they are bf16 bits
    /// (else f32): what a prepared weight file stores, and [`PackedB::from_bytes`] reads back.
    pub fn raw(&self) -> (&[u8], bool) {
        match self.data.slice() {
            PanelSlice::F32(d) => (bytemuck::cast_slice(d), false),
            PanelSlice::Bf16(d) => (bytemuck::cast_slice(d), true),
        }
    }

    /// Bytes the panels of a k x n matrix take: f32, or (`bf16`) bf16 bits.
    pub fn packed_len(k: usize, n: usize, bf16: bool) -> usize {
        n.div_ceil(NR) * k * NR * if bf16 { 2 } else { 4 }
    }

    /// Panels already packed (as [`PackedB::raw`] gives them), read in place at
    /// `owner.bytes()[start..]`: no copy, no packing. Fails when the range is out of bounds,
    /// not 64-byte aligned, or `k`, `n` are too large to address.
    pub fn from_bytes(k: usize, n: usize, bf16: bool, owner: std::sync::Arc<dyn PanelBytes>, start: usize) -> Result<Self, String> {
        let len = n
            .div_ceil(NR)
            .checked_mul(k)
            .and_then(|x| x.checked_mul(NR * if bf16 { 2 } else { 4 }))
            .ok_or_else(|| format!("a {k} x {n} packed matrix is too large"))?;
        let all = owner.bytes();
        let end = start.checked_add(len).filter(|&e| e <= all.len());
        if end.is_none() {
            return Err(format!("panels of a {k} x {n} matrix ({len} bytes at {start}) overrun the buffer of {} bytes", all.len()));
        }
        if !(all.as_ptr() as usize + start).is_multiple_of(64) {
            return Err(format!("panels of a {k} x {n} matrix at offset {start} are not 64-byte aligned"));
        }
        Ok(PackedB { k, n, data: Panels::Borrowed { owner, start, len, bf16 } })
    }

    /// Element (kk, col) of the packed matrix, as f32.
    pub fn get(&self, kk: usize, col: usize) -> f32 {
        let i = (col / NR) * self.k * NR + kk * NR + col % NR;
        match self.data.slice() {
            PanelSlice::F32(d) => d[i],
            PanelSlice::Bf16(d) => f32::from_bits((d[i] as u32) << 16),
        }
    }

    /// Column `col` (all `k` rows) as f32 into `out`: row `col` of a weight packed transposed
    /// (`[n, k]` stored), so a gather can read a tied embedding from its LM head's panels.
    pub fn column(&self, col: usize, out: &mut [f32]) {
        let base = (col / NR) * self.k * NR + col % NR;
        let at = (0..self.k.min(out.len())).map(|kk| base + kk * NR);
        match self.data.slice() {
            PanelSlice::F32(d) => out.iter_mut().zip(at).for_each(|(o, i)| *o = d[i]),
            PanelSlice::Bf16(d) => out.iter_mut().zip(at).for_each(|(o, i)| *o = f32::from_bits((d[i] as u32) << 16)),
        }
    }

    /// Packs a k x n right-hand side straight from a checkpoint's bytes: stored `[n, k]` (a
    /// PyTorch weight, `transposed`) or `[k, n]`. No f32 copy of the weight is made; a bf16
    /// checkpoint's 3 B parameters would otherwise allocate (and the kernel zero) 12 GB of
    /// pages just to be read once.
    pub fn pack_stored(src: Stored, k: usize, n: usize, transposed: bool) -> Self {
        assert!(src.len() >= k * n, "sgemm512: {} stored elements for a {k} x {n} weight", src.len());
        // One monomorphic packing loop per dtype: the dtype is not matched per element.
        fn layout<T: Copy + Default + Send + Sync>(k: usize, n: usize, transposed: bool, get: impl Fn(usize) -> T + Sync) -> Vec<T> {
            if transposed {
                pack_with(k, n, |kk, col| get(col * k + kk))
            } else {
                pack_with(k, n, |kk, col| get(kk * n + col))
            }
        }
        let data = match src {
            Stored::F32(b) => Panels::F32(layout(k, n, transposed, |i| Stored::F32(b).get(i))),
            // bf16 stays bf16: its bits, widened when used.
            Stored::Bf16(b) => Panels::Bf16(layout(k, n, transposed, |i| u16::from_le_bytes([b[2 * i], b[2 * i + 1]]))),
            Stored::F16(b) => Panels::F32(layout(k, n, transposed, |i| Stored::F16(b).get(i))),
        };
        PackedB { k, n, data }
    }
}

/// Packs the k x n matrix whose element (kk, col) is `at(kk, col)` into panels.
fn pack_with<T: Copy + Default + Send + Sync>(k: usize, n: usize, at: impl Fn(usize, usize) -> T + Sync) -> Vec<T> {
    let panels = n.div_ceil(NR);
    let mut data = vec![T::default(); panels * k * NR];
    // 64 rows of a panel (8 KiB) at a time, so its cache lines stay in L1 while each of
    // the 32 columns fills its lane (a whole panel column by column thrashes them).
    const KB: usize = 64;
    data.par_chunks_mut((k * NR).max(1)).enumerate().for_each(|(p, panel)| {
        for k0 in (0..k).step_by(KB) {
            for j in 0..NR.min(n - p * NR) {
                let col = p * NR + j;
                for kk in k0..(k0 + KB).min(k) {
                    panel[kk * NR + j] = at(kk, col);
                }
            }
        }
    });
    data
}

/// C (m x n, row-major, contiguous) = A (m x k, row stride `lda`) * B.
pub fn matmul_packed(a: &[f32], m: usize, lda: usize, b: &PackedB, c: &mut [f32]) {
    let (k, n) = (b.k, b.n);
    assert!(c.len() == m * n, "sgemm512: C has {} elements, want {m}x{n}", c.len());
    assert!(m == 0 || (m - 1) * lda + k <= a.len(), "sgemm512: A too short");
    assert!(available(), "sgemm512: the CPU lacks AVX-512F");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c.fill(0.0);
        return;
    }
    let panels = n.div_ceil(NR);
    // Split columns across threads (each streams its share of the weight once), a few
    // panels per task for balance.
    let per = panels.div_ceil(3 * rayon::current_num_threads()).max(1);
    let cp = SyncPtr(c.as_mut_ptr());
    (0..panels.div_ceil(per)).into_par_iter().for_each(|t| {
        let (p0, p1) = (t * per, ((t + 1) * per).min(panels));
        // SAFETY: C holds m x n (asserted above); tasks own disjoint column ranges.
        unsafe { panel_range(a, m, lda, b, p0, p1, cp.get().add(p0 * NR), n) };
    });
}

/// A gated product's epilogue: `(row, first column, gate part, output part)`.
pub type GatedEpilogue<'a> = dyn Fn(usize, usize, &[f32], &mut [f32]) + Sync + 'a;

/// The gated product of one `A` and two packed matrices of one shape (a GLU's gate and up
/// weights), in one parallel pass: each task computes its columns of `A * gate` into a scratch
/// of its own and the same columns of `A * up` into `c`, then calls `epilogue(row, col0,
/// gate_part, c_part)` on each row's part (`col0` the part's first column) before the next task's
/// columns, so the first product is never stored whole. Each product's elements are the bits
/// [`matmul_packed`] gives (the same tiles, the same order over K).
pub fn matmul_packed_gated(a: &[f32], m: usize, lda: usize, gate: &PackedB, up: &PackedB, c: &mut [f32], epilogue: &GatedEpilogue) {
    let (k, n) = (up.k, up.n);
    assert!(gate.k == k && gate.n == n, "sgemm512: gate {}x{} and up {k}x{n} differ", gate.k, gate.n);
    assert!(c.len() == m * n, "sgemm512: C has {} elements, want {m}x{n}", c.len());
    assert!(m == 0 || (m - 1) * lda + k <= a.len(), "sgemm512: A too short");
    assert!(available(), "sgemm512: the CPU lacks AVX-512F");
    if m == 0 || n == 0 {
        return;
    }
    let panels = n.div_ceil(NR);
    let per = panels.div_ceil(3 * rayon::current_num_threads()).max(1);
    let cp = SyncPtr(c.as_mut_ptr());
    (0..panels.div_ceil(per)).into_par_iter().for_each(|t| {
        let (p0, p1) = (t * per, ((t + 1) * per).min(panels));
        let (col0, cols) = (p0 * NR, (p1 * NR).min(n) - p0 * NR);
        let width = (p1 - p0) * NR;
        let mut g = GATE.with(|w| w.take());
        g.clear();
        g.resize(m * width, 0.0);
        // SAFETY: the scratch holds m rows of `width` (the task's panels); C holds m x n
        // (asserted above) and tasks own disjoint column ranges, so each C part below is
        // written by this task alone.
        unsafe {
            if k == 0 {
                for r in 0..m {
                    std::slice::from_raw_parts_mut(cp.get().add(r * n + col0), cols).fill(0.0);
                }
            } else {
                panel_range(a, m, lda, gate, p0, p1, g.as_mut_ptr(), width);
                panel_range(a, m, lda, up, p0, p1, cp.get().add(col0), n);
            }
            for r in 0..m {
                let part = std::slice::from_raw_parts_mut(cp.get().add(r * n + col0), cols);
                epilogue(r, col0, &g[r * width..r * width + cols], part);
            }
        }
        GATE.with(|w| w.replace(g));
    });
}

/// `A * B` for B's panels `p0..p1` (columns `p0 * 32..`), written at `c` (that part's first
/// column, row stride `ldc`).
///
/// # Safety
/// `c` must hold `m` rows of `ldc` elements from the part's first column on, with `ldc` at
/// least the part's width, and no other thread may write them meanwhile; `available()` holds,
/// `k > 0`, and `a` holds `m` rows of stride `lda` and `k` columns.
#[allow(clippy::too_many_arguments)]
unsafe fn panel_range(a: &[f32], m: usize, lda: usize, b: &PackedB, p0: usize, p1: usize, c: *mut f32, ldc: usize) {
    let (k, n) = (b.k, b.n);
    // The widened slice of a bf16 panel, kept per thread between calls.
    // With one row tile (m <= 12: decode) the micro-kernel reads the bf16 bits itself, so a
    // memory-bound step reads half the bytes; with more, widening once per slice is cheaper
    // than widening in every tile.
    let data = b.data.slice();
    let widen = matches!(data, PanelSlice::Bf16(_)) && m > MR;
    let mut wide = Vec::new();
    if widen {
        wide = WIDE.with(|w| w.take());
        wide.resize(wide.len().max(KC * NR), 0.0);
    }
    for k0 in (0..k).step_by(KC) {
        let kc = KC.min(k - k0);
        for p in p0..p1 {
            let cols = NR.min(n - p * NR);
            let range = p * k * NR + k0 * NR..p * k * NR + (k0 + kc) * NR;
            // The slice as f32, or (one row tile) its bf16 bits.
            let (bp, bits): (&[f32], *const u16) = match &data {
                PanelSlice::F32(d) => (&d[range], std::ptr::null()),
                PanelSlice::Bf16(d) if !widen => (&[], d[range].as_ptr()),
                PanelSlice::Bf16(d) => {
                    let w = &mut wide[..kc * NR];
                    for (o, &h) in w.iter_mut().zip(&d[range]) {
                        *o = f32::from_bits((h as u32) << 16);
                    }
                    (w, std::ptr::null())
                }
            };
            let mut r0 = 0;
            while r0 < m {
                let rows = MR.min(m - r0);
                // SAFETY: `available()` holds (the caller's contract); A rows r0..r0+rows at
                // columns k0..k0+kc lie inside `a`; the panel slice (f32, or bf16 bits at
                // `bits`) holds kc rows of 32; C's tile rows r0.. at the panel's columns lie
                // inside the caller's part of `c`, which no other thread writes.
                unsafe {
                    let (at, ct) = (a.as_ptr().add(r0 * lda + k0), c.add(r0 * ldc + (p - p0) * NR));
                    if bits.is_null() {
                        tile::<false>(rows, kc, at, lda, bp.as_ptr(), ct, ldc, cols, k0 == 0);
                    } else {
                        tile::<true>(rows, kc, at, lda, bits as *const f32, ct, ldc, cols, k0 == 0);
                    }
                }
                r0 += rows;
            }
        }
    }
    if widen {
        WIDE.with(|w| w.replace(wide));
    }
}

thread_local! {
    /// A widened bf16 panel slice (KC x 32 f32), one per thread, reused between calls.
    static WIDE: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    /// A task's part of the gate product ([`matmul_packed_gated`]), one per thread, reused.
    static GATE: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Dispatches a tile of `rows` (1..=12) rows to the micro-kernel built for that height.
/// `H`: `b` points at the panel slice's bf16 bits (as `*const u16`), not at f32.
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const H: bool>(
    rows: usize,
    kc: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    cols: usize,
    first: bool,
) {
    // SAFETY: every arm forwards the caller's contract unchanged.
    unsafe {
        match rows {
            12 => micro::<12, H>(kc, a, lda, b, c, ldc, cols, first),
            11 => micro::<11, H>(kc, a, lda, b, c, ldc, cols, first),
            10 => micro::<10, H>(kc, a, lda, b, c, ldc, cols, first),
            9 => micro::<9, H>(kc, a, lda, b, c, ldc, cols, first),
            8 => micro::<8, H>(kc, a, lda, b, c, ldc, cols, first),
            7 => micro::<7, H>(kc, a, lda, b, c, ldc, cols, first),
            6 => micro::<6, H>(kc, a, lda, b, c, ldc, cols, first),
            5 => micro::<5, H>(kc, a, lda, b, c, ldc, cols, first),
            4 => micro::<4, H>(kc, a, lda, b, c, ldc, cols, first),
            3 => micro::<3, H>(kc, a, lda, b, c, ldc, cols, first),
            2 => micro::<2, H>(kc, a, lda, b, c, ldc, cols, first),
            _ => micro::<1, H>(kc, a, lda, b, c, ldc, cols, first),
        }
    }
}

/// `C[0..R, 0..cols] (+)= A[0..R, 0..kc] * panel[0..kc, 0..32]`; `first` overwrites C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro<const R: usize, const H: bool>(
    kc: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    cols: usize,
    first: bool,
) {
    use std::arch::x86_64::*;
    let mut lo = [_mm512_setzero_ps(); R];
    let mut hi = [_mm512_setzero_ps(); R];
    // SAFETY: the caller guarantees the A, panel and C ranges named in `matmul_packed`.
    unsafe {
        for kk in 0..kc {
            let (b0, b1) = if H {
                // 32 bf16 -> two f32 vectors: zero-extend to 32 bits, shift into the high half.
                let h = (b as *const u16).add(kk * NR);
                if R <= 2 {
                    // Few rows: memory-bound, and the panel's 64-byte rows are one cache line
                    // each; ask for the line 32 rows ahead (the hardware streamer restarts at
                    // every 4 KiB page). Measured on Gemma 2 2B bf16 decode: 340 -> 275 ms per
                    // token (16 rows ahead: 290). A prefetch past the end never faults, and
                    // `wrapping_add` keeps the address computation defined.
                    _mm_prefetch::<_MM_HINT_T0>(h.wrapping_add(32 * NR) as *const i8);
                }
                let lo16 = _mm256_loadu_si256(h as *const __m256i);
                let hi16 = _mm256_loadu_si256(h.add(16) as *const __m256i);
                (
                    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(lo16))),
                    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(hi16))),
                )
            } else {
                if R <= 2 {
                    // As above, 16 rows ahead; an f32 panel row is two cache lines. Measured on
                    // Gemma 2 2B f32 decode: 508-532 -> 431-486 ms per token.
                    _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add((kk + 16) * NR) as *const i8);
                    _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add((kk + 16) * NR + 16) as *const i8);
                }
                (_mm512_loadu_ps(b.add(kk * NR)), _mm512_loadu_ps(b.add(kk * NR + 16)))
            };
            for r in 0..R {
                let av = _mm512_set1_ps(*a.add(r * lda + kk));
                lo[r] = _mm512_fmadd_ps(av, b0, lo[r]);
                hi[r] = _mm512_fmadd_ps(av, b1, hi[r]);
            }
        }
        let m0: __mmask16 = if cols >= 16 { 0xffff } else { ((1u32 << cols) - 1) as u16 };
        let m1: __mmask16 = if cols >= 32 {
            0xffff
        } else if cols <= 16 {
            0
        } else {
            ((1u32 << (cols - 16)) - 1) as u16
        };
        for r in 0..R {
            let cr = c.add(r * ldc);
            // Masked lanes are neither read nor written, so a partial tile at the right
            // edge of C touches only its own columns.
            if !first {
                lo[r] = _mm512_add_ps(lo[r], _mm512_maskz_loadu_ps(m0, cr));
                hi[r] = _mm512_add_ps(hi[r], _mm512_maskz_loadu_ps(m1, cr.add(16)));
            }
            _mm512_mask_storeu_ps(cr, m0, lo[r]);
            _mm512_mask_storeu_ps(cr.add(16), m1, hi[r]);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn micro<const R: usize, const H: bool>(_: usize, _: *const f32, _: usize, _: *const f32, _: *mut f32, _: usize, _: usize, _: bool) {
    unreachable!("sgemm512 is only dispatched when available() is true")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::Rng;

    /// Packing from stored f32, bf16 and f16 bytes, in both layouts, equals packing their f32
    /// values.
    #[test]
    fn pack_stored_equals_pack_of_the_converted_weight() {
        let (k, n) = (1200, 45); // k over one 1152-deep pass
        let mut rng = Rng::new(11);
        let w = rng.vec(k * n, -2.0, 2.0);
        let bf: Vec<u8> = w.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect();
        let hf: Vec<u8> = w.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect();
        let f: Vec<u8> = w.iter().flat_map(|&x| x.to_le_bytes()).collect();
        for src in [Stored::F32(&f), Stored::Bf16(&bf), Stored::F16(&hf)] {
            let vals: Vec<f32> = (0..k * n).map(|i| src.get(i)).collect();
            assert_eq!(vals[5].to_bits(), {
                let want = match src {
                    Stored::F32(_) => w[5],
                    Stored::Bf16(_) => half::bf16::from_f32(w[5]).to_f32(),
                    Stored::F16(_) => half::f16::from_f32(w[5]).to_f32(),
                };
                want.to_bits()
            });
            for transposed in [true, false] {
                let view = if transposed { MatView::transposed(&vals, k, n) } else { MatView::row_major(&vals, k, n) };
                let want = PackedB::pack(view);
                let got = PackedB::pack_stored(src, k, n, transposed);
                assert_eq!((got.k, got.n), (want.k, want.n));
                for kk in 0..k {
                    for col in 0..n {
                        assert_eq!(
                            got.get(kk, col).to_bits(),
                            want.get(kk, col).to_bits(),
                            "{src:?} transposed {transposed} ({kk}, {col})"
                        );
                    }
                }
                // bf16 panels hold half the bytes, and products through them equal the f32 ones.
                let half_bytes = matches!(src, Stored::Bf16(_));
                assert_eq!(got.bytes() * if half_bytes { 2 } else { 1 }, want.bytes());
                for m in [1, 13, 30] {
                    let a = rng.vec(m * k, -1.0, 1.0);
                    let (mut c1, mut c2) = (vec![0.0; m * n], vec![0.0; m * n]);
                    matmul_packed(&a, m, k, &got, &mut c1);
                    matmul_packed(&a, m, k, &want, &mut c2);
                    assert!(c1.iter().zip(&c2).all(|(x, y)| x.to_bits() == y.to_bits()), "{src:?} m {m}");
                }
            }
        }
    }

    /// A 64-byte aligned buffer standing in for a mapped prepared file.
    #[derive(Debug)]
    struct Buf(Vec<u64>, usize);
    impl PanelBytes for Buf {
        fn bytes(&self) -> &[u8] {
            &bytemuck::cast_slice(&self.0)[self.1..]
        }
    }

    /// Panels read in place from another buffer (as from a mapped prepared file) give the same
    /// products, bit for bit, as the packed copy they were written from, f32 and bf16; ranges
    /// out of bounds or misaligned are refused.
    #[test]
    fn borrowed_panels_equal_owned_ones() {
        if !available() {
            eprintln!("no AVX-512F on this CPU: nothing to test");
            return;
        }
        let (k, n) = (1300, 70);
        let mut rng = Rng::new(5);
        let w = rng.vec(k * n, -2.0, 2.0);
        let bf: Vec<u8> = w.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect();
        let f: Vec<u8> = w.iter().flat_map(|&x| x.to_le_bytes()).collect();
        for src in [Stored::F32(&f), Stored::Bf16(&bf)] {
            let owned = PackedB::pack_stored(src, k, n, true);
            let (raw, bf16) = owned.raw();
            assert_eq!(raw.len(), PackedB::packed_len(k, n, bf16));
            // 64-byte aligned storage, the panels at byte 128.
            let mut words = vec![0u64; (raw.len() + 256) / 8 + 8];
            let skip = (64 - (words.as_ptr() as usize) % 64) % 64;
            bytemuck::cast_slice_mut::<u64, u8>(&mut words)[skip + 128..skip + 128 + raw.len()].copy_from_slice(raw);
            let owner: std::sync::Arc<dyn PanelBytes> = std::sync::Arc::new(Buf(words, skip));
            let borrowed = PackedB::from_bytes(k, n, bf16, owner.clone(), 128).unwrap();
            for m in [1, 13] {
                let a = rng.vec(m * k, -1.0, 1.0);
                let (mut c1, mut c2) = (vec![0.0; m * n], vec![0.0; m * n]);
                matmul_packed(&a, m, k, &borrowed, &mut c1);
                matmul_packed(&a, m, k, &owned, &mut c2);
                assert!(c1.iter().zip(&c2).all(|(x, y)| x.to_bits() == y.to_bits()), "{src:?} m {m}");
            }
            assert!(PackedB::from_bytes(k, n, bf16, owner.clone(), 4).unwrap_err().contains("aligned"));
            assert!(PackedB::from_bytes(k, n, bf16, owner.clone(), 192 + raw.len()).unwrap_err().contains("overrun"));
        }
    }

    #[test]
    fn matches_naive_on_ragged_shapes() {
        if !available() {
            eprintln!("no AVX-512F on this CPU: nothing to test");
            return;
        }
        let mut rng = Rng::new(7);
        for &(m, k, n) in &[(1, 1, 1), (13, 7, 33), (25, 300, 70), (12, 256, 32), (37, 513, 65), (14, 2500, 40)] {
            let a = rng.vec(m * k, -1.0, 1.0);
            let w = rng.vec(n * k, -1.0, 1.0); // [n, k], used transposed
            let packed = PackedB::pack(MatView::transposed(&w, k, n));
            let mut c = vec![f32::NAN; m * n];
            matmul_packed(&a, m, k, &packed, &mut c);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k).map(|l| a[i * k + l] as f64 * w[j * k + l] as f64).sum();
                    let got = c[i * n + j] as f64;
                    assert!((got - want).abs() <= 1e-4 * (1.0 + want.abs()), "({m},{k},{n}) at ({i},{j}): {got} vs {want}");
                }
            }
        }
    }
}
