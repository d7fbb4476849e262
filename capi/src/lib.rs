//! kiln's C ABI: open a compiled artifact with its weights, ask for its entries and their
//! inputs and outputs, run an entry on caller-owned buffers, read the last error, close.
//!
//! The library holds the runtime only (program loading, the arena executor, the cpu kernels,
//! weight mapping): no compiler passes, model builders or tokenizer. `include/kiln.h` is
//! generated from this crate by cbindgen (the `header` test checks it is current).
//!
//! Rules every function keeps: errors come back as a [`KilnStatus`] with a message from
//! [`kiln_last_error`]; a Rust panic is caught and returned as `KILN_STATUS_PANIC`, never
//! unwound into C; out-parameters are written only on success.
//!
//! States: a generation program (`kiln compile --generate`) keeps its KV cache as persistent
//! states the session owns; `kiln_session_state_*` describe, zero and read them, and
//! `kiln_session_run` takes a state's buffer as NULL with 0 bytes to use it in place.
//!
//! Threads: a `KilnSession*` may be used from several threads at once. Queries run in
//! parallel; runs of one session take its lock and run one at a time (the session owns one
//! memory arena). For parallel runs open one session per thread. `kiln_session_close` must
//! not race with other calls on the same session.

mod error;
mod session;
mod types;

pub use error::CapiError;
pub use session::KilnSession;
pub use types::{KilnDtype, KilnInput, KilnIoInfo, KilnOutput, KilnStatus};

use error::{guard, last_error_ptr};
use session::Side;
use std::ffi::{c_char, c_void, CStr};
use std::path::PathBuf;

/// The version of this C ABI. A caller passes the value from the header it was compiled
/// against to `kiln_session_open`; a library of another version refuses it.
pub const KILN_ABI_VERSION: u32 = 1;

/// The ABI version this library implements (compare with `KILN_ABI_VERSION` from kiln.h).
#[no_mangle]
pub extern "C" fn kiln_abi_version() -> u32 {
    KILN_ABI_VERSION
}

/// The artifact (`.kiln`) format version this library reads; artifacts of another version
/// are refused with `KILN_STATUS_ARTIFACT_VERSION`.
#[no_mangle]
pub extern "C" fn kiln_artifact_version() -> u32 {
    kiln_graph::artifact::FORMAT_VERSION
}

/// The message of this thread's last failed call (empty if none failed yet). The string is
/// owned by the library and valid until the next failing kiln call on this thread.
#[no_mangle]
pub extern "C" fn kiln_last_error() -> *const c_char {
    last_error_ptr()
}

/// A NUL-terminated argument as a `CStr`.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that outlives the returned borrow.
unsafe fn c_str<'a>(p: *const c_char, arg: &'static str) -> Result<&'a CStr, CapiError> {
    if p.is_null() {
        return Err(CapiError::Null(arg));
    }
    // SAFETY: non-NULL and NUL-terminated (caller contract).
    Ok(unsafe { CStr::from_ptr(p) })
}

/// A path argument: bytes as they are on Unix, UTF-8 elsewhere.
///
/// # Safety
/// As for [`c_str`].
unsafe fn c_path(p: *const c_char, arg: &'static str) -> Result<PathBuf, CapiError> {
    // SAFETY: forwarded caller contract.
    let s = unsafe { c_str(p, arg) }?;
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        Ok(PathBuf::from(std::ffi::OsStr::from_bytes(s.to_bytes())))
    }
    #[cfg(not(unix))]
    {
        let s = s.to_str().map_err(|e| CapiError::Invalid { arg, msg: format!("not UTF-8: {e}") })?;
        Ok(PathBuf::from(s))
    }
}

/// A session argument as a reference.
///
/// # Safety
/// `s` is NULL or a pointer returned by `kiln_session_open` and not yet closed.
unsafe fn session<'a>(s: *const KilnSession) -> Result<&'a KilnSession, CapiError> {
    // SAFETY: a non-NULL `s` is a live session (caller contract).
    unsafe { s.as_ref() }.ok_or(CapiError::Null("session"))
}

/// Writes an out-parameter.
///
/// # Safety
/// `out` is NULL or valid for a write of `T`.
unsafe fn put<T>(out: *mut T, arg: &'static str, v: T) -> Result<(), CapiError> {
    if out.is_null() {
        return Err(CapiError::Null(arg));
    }
    // SAFETY: non-NULL and writable (caller contract).
    unsafe { out.write(v) };
    Ok(())
}

/// Opens a session: loads the artifact at `artifact_path` and maps the weights at
/// `weights_path` (a `.safetensors` file or a folder of them), checking every weight the
/// artifact reads. The artifact's prepared weight file (`<artifact>.weights`, written by
/// `kiln compile` for the cpu and cuda backends) is mapped instead when it was made from
/// these weights, or when `weights_path` is NULL (then, without one, the folder the artifact
/// was compiled from is read); a corrupt or stale prepared file fails with
/// `KILN_STATUS_WEIGHTS`.
/// `abi_version` must be `KILN_ABI_VERSION`. On success `*out` receives the session; on
/// failure it is set to NULL.
///
/// # Safety
/// `artifact_path` is a NUL-terminated string, `weights_path` one or NULL; `out` is valid
/// for a write.
#[no_mangle]
pub unsafe extern "C" fn kiln_session_open(
    abi_version: u32,
    artifact_path: *const c_char,
    weights_path: *const c_char,
    out: *mut *mut KilnSession,
) -> KilnStatus {
    guard(|| {
        if out.is_null() {
            return Err(CapiError::Null("out"));
        }
        // SAFETY: `out` is non-NULL and writable (caller contract).
        unsafe { out.write(std::ptr::null_mut()) };
        if abi_version != KILN_ABI_VERSION {
            return Err(CapiError::AbiVersion { caller: abi_version, library: KILN_ABI_VERSION });
        }
        // SAFETY: NUL-terminated strings (caller contract).
        let artifact = unsafe { c_path(artifact_path, "artifact_path")? };
        // SAFETY: NULL or a NUL-terminated string (caller contract).
        let weights = if weights_path.is_null() { None } else { Some(unsafe { c_path(weights_path, "weights_path")? }) };
        let s = Box::new(KilnSession::open(&artifact, weights.as_deref())?);
        // SAFETY: as above.
        unsafe { out.write(Box::into_raw(s)) };
        Ok(())
    })
}

/// Closes a session and frees everything it holds (NULL is accepted and ignored). Pointers
/// the session returned (names, shapes) are invalid afterwards.
///
/// # Safety
/// `session` is NULL or an open session no other thread is using; it is not used again.
#[no_mangle]
pub unsafe extern "C" fn kiln_session_close(session: *mut KilnSession) {
    // Dropping frees memory and unmaps files; a panic here is caught and recorded.
    let _ = guard(|| {
        if !session.is_null() {
            // SAFETY: made by `Box::into_raw` in `kiln_session_open`, closed once (caller contract).
            drop(unsafe { Box::from_raw(session) });
        }
        Ok(())
    });
}

/// Writes the number of entries (callable programs such as `forward`) to `*out`.
///
/// # Safety
/// `session` is an open session; `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn kiln_session_entry_count(session: *const KilnSession, out: *mut usize) -> KilnStatus {
    // SAFETY: caller contract, forwarded.
    guard(|| unsafe { put(out, "out", self::session(session)?.entry_count()) })
}

/// Writes entry `index`'s name (owned by the session) to `*out`.
///
/// # Safety
/// `session` is an open session; `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn kiln_session_entry_name(session: *const KilnSession, index: usize, out: *mut *const c_char) -> KilnStatus {
    // SAFETY: caller contract, forwarded.
    guard(|| unsafe { put(out, "out", self::session(session)?.entry_name(index)?) })
}

/// The body of the four I/O queries.
///
/// # Safety
/// As for the functions that call it.
unsafe fn io_count(session: *const KilnSession, entry: *const c_char, side: Side, out: *mut usize) -> KilnStatus {
    guard(|| {
        // SAFETY: caller contract, forwarded.
        unsafe {
            let s = self::session(session)?;
            put(out, "out", s.io_count(c_str(entry, "entry")?, side)?)
        }
    })
}

/// The body of the I/O description queries.
///
/// # Safety
/// As for the functions that call it.
unsafe fn io_info(session: *const KilnSession, entry: *const c_char, side: Side, index: usize, out: *mut KilnIoInfo) -> KilnStatus {
    guard(|| {
        // SAFETY: caller contract, forwarded.
        unsafe {
            let s = self::session(session)?;
            put(out, "out", s.io_info(c_str(entry, "entry")?, side, index)?)
        }
    })
}

/// Writes the number of inputs of entry `entry` to `*out`.
///
/// # Safety
/// `session` is an open session; `entry` is NUL-terminated; `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn kiln_session_input_count(session: *const KilnSession, entry: *const c_char, out: *mut usize) -> KilnStatus {
    // SAFETY: caller contract, forwarded.
    unsafe { io_count(session, entry, Side::Input, out) }
}

/// Writes the number of outputs of entry `entry` to `*out`.
///
/// # Safety
/// `session` is an open session; `entry` is NUL-terminated; `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn kiln_session_output_count(session: *const KilnSession, entry: *const c_char, out: *mut usize) -> KilnStatus {
    // SAFETY: caller contract, forwarded.
    unsafe { io_count(session, entry, Side::Output, out) }
}

/// Describes input `index` of entry `entry` (name, dtype, shape, bytes) into `*out`.
///
/// # Safety
/// `session` is an open session; `entry` is NUL-terminated; `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn kiln_session_input_info(
    session: *const KilnSession,
    entry: *const c_char,
    index: usize,
    out: *mut KilnIoInfo,
) -> KilnStatus {
    // SAFETY: caller contract, forwarded.
    unsafe { io_info(session, entry, Side::Input, index, out) }
}

/// Describes output `index` of entry `entry` (name, dtype, shape, bytes) into `*out`.
///
/// # Safety
/// `session` is an open session; `entry` is NUL-terminated; `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn kiln_session_output_info(
    session: *const KilnSession,
    entry: *const c_char,
    index: usize,
    out: *mut KilnIoInfo,
) -> KilnStatus {
    // SAFETY: caller contract, forwarded.
    unsafe { io_info(session, entry, Side::Output, index, out) }
}

/// Runs entry `entry`: reads `n_inputs` input buffers and writes `n_outputs` output buffers,
/// each in the entry's declared order and of exactly its declared dtype and byte size. Every
/// buffer is checked before anything runs. No memory is allocated (for entries of up to 128
/// inputs and outputs). Runs of one session are serialized; see the threading rule.
///
/// States: an input or output whose name is a persistent state (see
/// `kiln_session_state_count`; a generation program's `cache.{layer}.key` / `.value`) may be
/// given with `data` NULL and `bytes` 0: the entry then reads (input) or updates (output) the
/// state in place, which is how a KV cache is carried from `prefill` through each `decode`. A
/// full buffer still works: as an input it sets the state first, as an output it also
/// receives a copy. Any other size is an error, as for every other buffer.
///
/// # Safety
/// `session` is an open session; `entry` and every non-NULL buffer name are NUL-terminated;
/// `inputs` points to `n_inputs` `KilnInput`s and `outputs` to `n_outputs` `KilnOutput`s (each
/// may be NULL when its count is 0); each buffer's `data` holds `bytes` readable (inputs) or
/// writable (outputs) bytes for the duration of the call.
#[no_mangle]
pub unsafe extern "C" fn kiln_session_run(
    session: *const KilnSession,
    entry: *const c_char,
    inputs: *const KilnInput,
    n_inputs: usize,
    outputs: *const KilnOutput,
    n_outputs: usize,
) -> KilnStatus {
    guard(|| {
        // SAFETY: caller contract, forwarded.
        unsafe {
            let s = self::session(session)?;
            s.run(c_str(entry, "entry")?, inputs, n_inputs, outputs, n_outputs)
        }
    })
}

/// Writes the number of persistent states to `*out` (0 for a program without any). States are
/// buffers the session keeps between runs, such as a generation program's KV cache
/// (`cache.{layer}.key` / `.value`); they are zeroed when the session opens. An entry input or
/// output named like a state may be passed to `kiln_session_run` with `data` NULL and `bytes`
/// 0 to use the state in place.
///
/// # Safety
/// `session` is an open session; `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn kiln_session_state_count(session: *const KilnSession, out: *mut usize) -> KilnStatus {
    // SAFETY: caller contract, forwarded.
    guard(|| unsafe { put(out, "out", self::session(session)?.state_count()) })
}

/// Describes state `index` (name, dtype, shape, bytes) into `*out`. The pointers are owned by
/// the session.
///
/// # Safety
/// `session` is an open session; `out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn kiln_session_state_info(session: *const KilnSession, index: usize, out: *mut KilnIoInfo) -> KilnStatus {
    // SAFETY: caller contract, forwarded.
    guard(|| unsafe { put(out, "out", self::session(session)?.state_info(index)?) })
}

/// Zeroes every state (an empty KV cache, as when the session opens). A generation program
/// does not need it between generations: its prefill writes the prompt's K/V rows in place
/// and attention reads only the rows written so far. Takes the session's run lock, so it
/// waits for a run in progress.
///
/// # Safety
/// `session` is an open session.
#[no_mangle]
pub unsafe extern "C" fn kiln_session_reset_states(session: *const KilnSession) -> KilnStatus {
    // SAFETY: caller contract, forwarded.
    guard(|| unsafe { self::session(session)?.reset_states() })
}

/// Reorders the batch rows of every state in place, on the session's device: afterwards row
/// `r` of each state holds what its row `rows[r]` held (rows may repeat or be left out). `n`
/// must be every state's leading (batch) axis and each index below it. This is how several
/// samples share one prefill (compile with rows per input, run `prefill`, then gather rows
/// `{0,0,..,1,1,..}`) and how beam search keeps its beams in the KV cache (gather the
/// surviving beams' rows after each step), as `kiln generate --num-samples / --num-beams` do.
/// Takes the session's run lock.
///
/// # Safety
/// `session` is an open session; `rows` holds `n` readable values (or is NULL with `n == 0`).
#[no_mangle]
pub unsafe extern "C" fn kiln_session_gather_state_rows(session: *const KilnSession, rows: *const usize, n: usize) -> KilnStatus {
    // SAFETY: caller contract, forwarded.
    guard(|| unsafe { self::session(session)?.gather_state_rows(rows, n) })
}

/// Copies state `index`'s current contents into `data`, which holds `bytes` bytes: exactly the
/// state's size (`KilnIoInfo.bytes` from `kiln_session_state_info`). Takes the session's run
/// lock. Allocates a temporary copy (unlike `kiln_session_run`).
///
/// # Safety
/// `session` is an open session; `data` holds `bytes` writable bytes for the duration of the
/// call.
#[no_mangle]
pub unsafe extern "C" fn kiln_session_read_state(session: *const KilnSession, index: usize, data: *mut c_void, bytes: usize) -> KilnStatus {
    guard(|| {
        // SAFETY: caller contract, forwarded.
        unsafe { self::session(session)?.read_state(index, data.cast(), bytes) }
    })
}
