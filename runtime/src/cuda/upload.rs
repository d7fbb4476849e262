//! Weight upload at load: each weight's bytes as [`upload_bytes`] makes them (from a mapped
//! prepared file as stored; from a mapped checkpoint, converted only where its dtype differs
//! from the program's), copied to the device through a ring of pinned staging buffers, so the
//! host fills one buffer (in parallel, over the cores) while the DMA engine drains the others.
//! No second host copy of the whole model is made. A load runs this on a thread and stream of
//! its own while the modules load (`exec::CudaExec::new`).
//!
//! [`upload_bytes`]: crate::prepared::cuda::upload_bytes
//!
//! `KILN_CUDA_UPLOAD=pageable` uploads each tensor from ordinary host memory instead (one
//! host copy of the model, as before; for comparison on a device), and `KILN_CUDA_VERBOSE=1`
//! prints the bytes, the time and the rate of the upload.

use crate::error::{Result, RuntimeError};
use crate::weights::WeightStore;
use cudarc::driver::{result as dr, sys, CudaContext};
use kiln_graph::program::Program;
use rayon::prelude::*;
use std::ffi::c_void;
use std::sync::Arc;
use std::time::Instant;

/// Bytes per staging buffer.
const STAGE: usize = 32 << 20;
/// Staging buffers in the ring.
const RING: usize = 3;
/// Host copies into a staging buffer are split into pieces of this size over the cores.
const PIECE: usize = 1 << 20;

fn err(msg: impl Into<String>) -> RuntimeError {
    RuntimeError::Unsupported { backend: "cuda".into(), msg: msg.into() }
}

fn drv<T>(what: &str, r: std::result::Result<T, dr::DriverError>) -> Result<T> {
    r.map_err(|e| err(format!("{what}: {e:?}")))
}

/// One pinned buffer and the event recorded after the copy that last read it.
struct Slot {
    ptr: *mut u8,
    done: sys::CUevent,
    used: bool,
}

/// A ring of pinned staging buffers, freed on drop (after the stream is synchronised).
struct Ring {
    slots: Vec<Slot>,
    size: usize,
    next: usize,
}

impl Ring {
    /// `None` where pinned memory cannot be had (the upload then goes from pageable memory).
    fn new(size: usize) -> Option<Ring> {
        let mut ring = Ring { slots: Vec::with_capacity(RING), size, next: 0 };
        for _ in 0..RING {
            // SAFETY: a plain pinned allocation, freed in Drop; its bytes are written before read.
            let ptr = unsafe { dr::malloc_host(size, 0) }.ok()?;
            let done = match dr::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING) {
                Ok(e) => e,
                Err(_) => {
                    // SAFETY: allocated just above.
                    let _ = unsafe { dr::free_host(ptr) };
                    return None;
                }
            };
            ring.slots.push(Slot { ptr: ptr as *mut u8, done, used: false });
        }
        Some(ring)
    }

    /// Copies `src` to device address `dst` on `stream`, through the ring.
    fn copy(&mut self, src: &[u8], dst: u64, stream: sys::CUstream) -> Result<()> {
        for (i, chunk) in src.chunks(self.size).enumerate() {
            let n = self.slots.len();
            let slot = &mut self.slots[self.next];
            self.next = (self.next + 1) % n;
            if slot.used {
                // SAFETY: an event of this context, recorded after the slot's last copy.
                drv("staging wait", unsafe { dr::event::synchronize(slot.done) })?;
            }
            // SAFETY: the slot holds `size >= chunk.len()` bytes and no copy reads it now (waited above).
            let buf = unsafe { std::slice::from_raw_parts_mut(slot.ptr, chunk.len()) };
            buf.par_chunks_mut(PIECE).zip(chunk.par_chunks(PIECE)).for_each(|(d, s)| d.copy_from_slice(s));
            let at = dst + (i * self.size) as u64;
            // SAFETY: `buf` is pinned and stays untouched until `done` fires; the destination
            // lies inside the allocation (the caller's layout).
            drv("upload", unsafe { dr::memcpy_htod_async(at, &*buf, stream) })?;
            // SAFETY: as above.
            drv("staging record", unsafe { dr::event::record(slot.done, stream) })?;
            slot.used = true;
        }
        Ok(())
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        for s in &self.slots {
            // SAFETY: the owner synchronised the stream (or gave up on it) before dropping;
            // the pointers and events were made in `new`.
            unsafe {
                let _ = dr::event::synchronize(s.done);
                let _ = dr::event::destroy(s.done);
                let _ = dr::free_host(s.ptr as *mut c_void);
            }
        }
    }
}

/// [`upload`] on a stream of its own, from the calling thread (a load runs it on a thread of
/// its own while the modules load): binds `ctx` to the thread, and waits for the copies.
pub(super) fn upload_on_own_stream(
    ctx: &Arc<CudaContext>,
    program: &Program,
    store: &WeightStore,
    base: u64,
    weights_at: &[usize],
    constants_at: &[usize],
) -> Result<()> {
    drv("bind context (upload thread)", ctx.bind_to_thread())?;
    let stream = drv("cuStreamCreate (upload)", ctx.new_stream())?;
    upload(program, store, base, weights_at, constants_at, stream.cu_stream())
}

/// Uploads the program's weights and constants to `base + offsets` on `stream` and waits for
/// the copies; `weights_at` and `constants_at` are the layout's offsets.
fn upload(
    program: &Program,
    store: &WeightStore,
    base: u64,
    weights_at: &[usize],
    constants_at: &[usize],
    stream: sys::CUstream,
) -> Result<()> {
    let t = Instant::now();
    let pageable = std::env::var("KILN_CUDA_UPLOAD").is_ok_and(|v| v == "pageable");
    let total: usize = program.weights.iter().map(|w| w.ty.bytes()).chain(program.constants.iter().map(|c| c.ty.bytes())).sum();
    let mut ring = if pageable { None } else { Ring::new(STAGE.min(total.max(1))) };
    // Pageable copies keep their host bytes alive until the synchronize below.
    let mut keep: Vec<Vec<u8>> = Vec::new();
    let mut send = |bytes: std::borrow::Cow<[u8]>, at: usize| -> Result<()> {
        let dst = base + at as u64;
        match ring.as_mut() {
            Some(r) => r.copy(&bytes, dst, stream),
            None => {
                let owned = bytes.into_owned();
                // SAFETY: the destination lies inside the allocation; `owned` is kept until
                // the synchronize below.
                drv("upload", unsafe { dr::memcpy_htod_async(dst, &owned[..], stream) })?;
                keep.push(owned);
                Ok(())
            }
        }
    };
    for (i, &at) in weights_at.iter().enumerate().take(program.weights.len()) {
        send(crate::prepared::cuda::upload_bytes(program, store, i)?, at)?;
    }
    for (c, &at) in program.constants.iter().zip(constants_at) {
        send(std::borrow::Cow::Owned(crate::tensor::from_f64(c.ty.dtype, &c.values)), at)?;
    }
    // SAFETY: the stream is the caller's.
    drv("upload sync", unsafe { dr::stream::synchronize(stream) })?;
    let pinned = ring.is_some();
    drop(ring);
    drop(keep);
    if std::env::var("KILN_CUDA_VERBOSE").is_ok_and(|v| v == "1") {
        let s = t.elapsed().as_secs_f64();
        let how = if pinned { "through pinned staging" } else { "from pageable memory" };
        eprintln!("kiln cuda: uploaded {:.1} MB {how} in {:.1} ms ({:.2} GB/s)", total as f64 / 1e6, s * 1e3, total as f64 / s / 1e9);
    }
    Ok(())
}
