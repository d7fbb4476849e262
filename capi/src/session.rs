//! The session behind a `KilnSession*`: the runtime's [`Session`] behind a mutex, and the
//! entries' and states' metadata as C strings and shapes that live as long as the handle.

use crate::error::CapiError;
use crate::types::{KilnDtype, KilnInput, KilnIoInfo, KilnOutput};
use kiln_graph::program::{Entry, Io, Program};
use kiln_runtime::Session;
use std::ffi::{c_char, CStr, CString};
use std::path::Path;
use std::ptr::addr_of;
use std::sync::Mutex;

/// Entries with at most this many inputs and outputs run without any allocation (their buffer
/// views live on the stack); larger ones allocate two small vectors per run. A generation
/// program's entries take two states per layer besides their own inputs.
const STACK_IO: usize = 128;

/// An open session: what `KilnSession*` points to. Opaque to C.
pub struct KilnSession {
    entries: Vec<EntryMeta>,
    /// The persistent states ([`Program::states`]), in the program's order.
    states: Vec<IoMeta>,
    /// Runs take the lock: the executable owns one arena, so runs of one session are serial.
    session: Mutex<Session>,
}

/// The C view of an entry's declaration.
struct EntryMeta {
    name: CString,
    inputs: Vec<IoMeta>,
    outputs: Vec<IoMeta>,
}

/// The C view of one input or output.
struct IoMeta {
    name: CString,
    dtype: KilnDtype,
    shape: Vec<usize>,
    bytes: usize,
    /// Named like a persistent state: a buffer for it may be NULL with 0 bytes (used in place).
    state: bool,
}

impl IoMeta {
    fn info(&self) -> KilnIoInfo {
        KilnIoInfo { name: self.name.as_ptr(), dtype: self.dtype, rank: self.shape.len(), shape: self.shape.as_ptr(), bytes: self.bytes }
    }

    fn name(&self) -> &str {
        self.name.to_str().unwrap_or("?")
    }
}

fn c_name(what: &str, name: &str) -> Result<CString, CapiError> {
    CString::new(name).map_err(|_| CapiError::Invalid { arg: "artifact", msg: format!("{what} name {name:?} contains a NUL byte") })
}

fn io_meta(what: &str, name: &str, ty: &kiln_graph::TensorType, state: bool) -> Result<IoMeta, CapiError> {
    Ok(IoMeta { name: c_name(what, name)?, dtype: KilnDtype::from_dtype(ty.dtype), shape: ty.shape.to_vec(), bytes: ty.bytes(), state })
}

fn entry_meta(p: &Program, e: &Entry) -> Result<EntryMeta, CapiError> {
    let what = format!("entry '{}': tensor", e.name);
    let meta = |io: &Io| io_meta(&what, &io.name, &io.operand.ty, p.state_index(&io.name).is_some());
    Ok(EntryMeta {
        name: c_name("entry", &e.name)?,
        inputs: e.inputs.iter().map(meta).collect::<Result<_, _>>()?,
        outputs: e.outputs.iter().map(meta).collect::<Result<_, _>>()?,
    })
}

/// Which side of an entry a query or buffer is about.
#[derive(Clone, Copy)]
pub enum Side {
    Input,
    Output,
}

/// One caller buffer, read field by field from C memory.
struct Raw {
    name: *const c_char,
    dtype: i32,
    data: *const u8,
    bytes: usize,
}

impl Raw {
    /// Reads input `i` of `p`.
    ///
    /// # Safety
    /// `p` points to at least `i + 1` readable `KilnInput`s.
    unsafe fn input(p: *const KilnInput, i: usize) -> Raw {
        // SAFETY: the caller guarantees `p.add(i)` is in bounds and readable. The dtype is
        // read as the i32 it is in C, so a value outside the enum is reported, not UB.
        unsafe {
            let q = p.add(i);
            Raw {
                name: addr_of!((*q).name).read(),
                dtype: addr_of!((*q).dtype).cast::<i32>().read(),
                data: addr_of!((*q).data).read().cast(),
                bytes: addr_of!((*q).bytes).read(),
            }
        }
    }

    /// Reads output `i` of `p`.
    ///
    /// # Safety
    /// `p` points to at least `i + 1` readable `KilnOutput`s.
    unsafe fn output(p: *const KilnOutput, i: usize) -> Raw {
        // SAFETY: as in `input`.
        unsafe {
            let q = p.add(i);
            Raw {
                name: addr_of!((*q).name).read(),
                dtype: addr_of!((*q).dtype).cast::<i32>().read(),
                data: addr_of!((*q).data).read().cast_const().cast(),
                bytes: addr_of!((*q).bytes).read(),
            }
        }
    }

    /// Checks the buffer against its declaration; `Err` holds the message.
    ///
    /// # Safety
    /// `name`, when not NULL, is a NUL-terminated string.
    unsafe fn check(&self, m: &IoMeta) -> Result<(), String> {
        if !self.name.is_null() {
            // SAFETY: the caller guarantees a non-NULL name is NUL-terminated.
            let given = unsafe { CStr::from_ptr(self.name) };
            if given != m.name.as_c_str() {
                return Err(format!("the buffer is named '{}', the entry declares '{}' here", given.to_string_lossy(), m.name()));
            }
        }
        if self.dtype != m.dtype as i32 {
            let given = dtype_name(self.dtype);
            return Err(format!("dtype {given} given, the entry declares {} {:?}", m.dtype.name(), m.shape));
        }
        if m.state && self.data.is_null() && self.bytes == 0 {
            // The state is used in place.
            return Ok(());
        }
        if self.bytes != m.bytes {
            let hint = if m.state { " (or data NULL and 0 bytes to use the state in place)" } else { "" };
            return Err(format!("{} bytes given, {} {:?} needs {}{hint}", self.bytes, m.dtype.name(), m.shape, m.bytes));
        }
        if self.data.is_null() && self.bytes != 0 {
            return Err("data is NULL".into());
        }
        Ok(())
    }

    /// The byte range `[start, end)` the buffer covers.
    fn range(&self) -> (usize, usize) {
        let start = self.data as usize;
        (start, start.saturating_add(self.bytes))
    }
}

fn dtype_name(code: i32) -> String {
    const ALL: [KilnDtype; 7] =
        [KilnDtype::F32, KilnDtype::F16, KilnDtype::Bf16, KilnDtype::I32, KilnDtype::I64, KilnDtype::U8, KilnDtype::Bool];
    ALL.iter().find(|d| **d as i32 == code).map(|d| d.name().to_string()).unwrap_or_else(|| format!("#{code} (not a KilnDtype)"))
}

fn overlaps(a: (usize, usize), b: (usize, usize)) -> bool {
    a.0 < a.1 && b.0 < b.1 && a.0 < b.1 && b.0 < a.1
}

impl KilnSession {
    /// Loads an artifact and its weights (`None`: its prepared weight file, else the folder it
    /// was compiled from).
    pub fn open(artifact: &Path, weights: Option<&Path>) -> Result<Self, CapiError> {
        let (session, _) = Session::load_with(artifact, weights, kiln_runtime::cpu::prepared::LoadOptions::default())?;
        let p = session.program();
        let entries = p.entries.iter().map(|e| entry_meta(p, e)).collect::<Result<_, _>>()?;
        let states = p.states.iter().map(|s| io_meta("state", &s.name, &s.ty, true)).collect::<Result<_, _>>()?;
        Ok(KilnSession { entries, states, session: Mutex::new(session) })
    }

    /// The number of persistent states.
    pub fn state_count(&self) -> usize {
        self.states.len()
    }

    /// State `i`'s metadata.
    fn state_meta(&self, i: usize) -> Result<&IoMeta, CapiError> {
        self.states
            .get(i)
            .ok_or_else(|| CapiError::Invalid { arg: "index", msg: format!("state {i} asked for, the artifact has {}", self.states.len()) })
    }

    /// Describes state `i`.
    pub fn state_info(&self, i: usize) -> Result<KilnIoInfo, CapiError> {
        self.state_meta(i).map(IoMeta::info)
    }

    /// Zeroes every state.
    pub fn reset_states(&self) -> Result<(), CapiError> {
        self.session.lock().map_err(|_| CapiError::Poisoned)?.reset_states()?;
        Ok(())
    }

    /// Reorders every state's batch rows in place on the device (`Session::gather_state_rows`).
    ///
    /// # Safety
    /// `rows` is NULL with `n == 0`, or holds `n` readable `usize` values for the call.
    pub unsafe fn gather_state_rows(&self, rows: *const usize, n: usize) -> Result<(), CapiError> {
        if rows.is_null() && n != 0 {
            return Err(CapiError::Null("rows"));
        }
        // SAFETY: non-NULL with `n` values (caller contract), or empty.
        let rows: &[usize] = if n == 0 { &[] } else { unsafe { std::slice::from_raw_parts(rows, n) } };
        self.session.lock().map_err(|_| CapiError::Poisoned)?.gather_state_rows(rows)?;
        Ok(())
    }

    /// Copies state `i` into the caller's buffer of `bytes` bytes (exactly the state's size).
    ///
    /// # Safety
    /// `data` is NULL or holds `bytes` writable bytes for the duration of the call.
    pub unsafe fn read_state(&self, i: usize, data: *mut u8, bytes: usize) -> Result<(), CapiError> {
        let m = self.state_meta(i)?;
        if bytes != m.bytes {
            let msg = format!("state {i} ('{}'): {bytes} bytes given, {} {:?} needs {}", m.name(), m.dtype.name(), m.shape, m.bytes);
            return Err(CapiError::Invalid { arg: "bytes", msg });
        }
        if data.is_null() && bytes != 0 {
            return Err(CapiError::Null("data"));
        }
        let t = self.session.lock().map_err(|_| CapiError::Poisoned)?.state(m.name())?;
        let t = t.ok_or_else(|| CapiError::Invalid { arg: "index", msg: format!("state '{}' is not in the program", m.name()) })?;
        if t.bytes.len() != bytes {
            let msg = format!("state '{}' holds {} bytes, {bytes} expected (internal error)", m.name(), t.bytes.len());
            return Err(CapiError::Invalid { arg: "index", msg });
        }
        if bytes > 0 {
            // SAFETY: `data` is non-NULL with `bytes` writable bytes (caller contract), and the
            // session's copy `t` is a separate allocation of the same length.
            unsafe { std::ptr::copy_nonoverlapping(t.bytes.as_ptr(), data, bytes) };
        }
        Ok(())
    }

    /// The number of entries.
    pub fn entry_count(&self) -> usize {
        self.entries.len()
    }

    /// Entry `i`'s name, owned by the session.
    pub fn entry_name(&self, i: usize) -> Result<*const c_char, CapiError> {
        self.entries.get(i).map(|e| e.name.as_ptr()).ok_or_else(|| CapiError::Invalid {
            arg: "index",
            msg: format!("entry {i} asked for, the artifact has {}", self.entries.len()),
        })
    }

    /// The entry named `name` and its index.
    fn find(&self, name: &CStr) -> Result<(usize, &EntryMeta), CapiError> {
        self.entries.iter().enumerate().find(|(_, e)| e.name.as_c_str() == name).ok_or_else(|| CapiError::UnknownEntry {
            name: name.to_string_lossy().into_owned(),
            have: self.entries.iter().map(|e| e.name.to_string_lossy().into_owned()).collect::<Vec<_>>().join(", "),
        })
    }

    fn side(e: &EntryMeta, side: Side) -> &[IoMeta] {
        match side {
            Side::Input => &e.inputs,
            Side::Output => &e.outputs,
        }
    }

    /// How many inputs or outputs entry `name` has.
    pub fn io_count(&self, name: &CStr, side: Side) -> Result<usize, CapiError> {
        Ok(Self::side(self.find(name)?.1, side).len())
    }

    /// Input or output `i` of entry `name`.
    pub fn io_info(&self, name: &CStr, side: Side, i: usize) -> Result<KilnIoInfo, CapiError> {
        let e = self.find(name)?.1;
        let ios = Self::side(e, side);
        let what = match side {
            Side::Input => "inputs",
            Side::Output => "outputs",
        };
        ios.get(i).map(IoMeta::info).ok_or_else(|| CapiError::Invalid {
            arg: "index",
            msg: format!("index {i} asked for, entry '{}' has {} {what}", e.name.to_string_lossy(), ios.len()),
        })
    }

    /// Runs entry `name` on caller buffers; checks every buffer first, allocates nothing for
    /// entries of up to [`STACK_IO`] inputs and outputs. A buffer for a state may be NULL with
    /// 0 bytes: the runtime then uses the state in place.
    ///
    /// # Safety
    /// `inputs` points to `n_in` readable `KilnInput`s (or is NULL with `n_in == 0`), `outputs`
    /// to `n_out` `KilnOutput`s likewise; every buffer's `data` holds `bytes` readable (inputs)
    /// or writable (outputs) bytes and every non-NULL name is NUL-terminated.
    pub unsafe fn run(
        &self,
        name: &CStr,
        inputs: *const KilnInput,
        n_in: usize,
        outputs: *const KilnOutput,
        n_out: usize,
    ) -> Result<(), CapiError> {
        let (ei, e) = self.find(name)?;
        let entry = || e.name.to_string_lossy().into_owned();
        if n_in != e.inputs.len() {
            let msg = format!("{n_in} input buffers given, the entry takes {}", e.inputs.len());
            return Err(CapiError::Input { entry: entry(), index: n_in, name: "-".into(), msg });
        }
        if n_out != e.outputs.len() {
            let msg = format!("{n_out} output buffers given, the entry has {}", e.outputs.len());
            return Err(CapiError::Output { entry: entry(), index: n_out, name: "-".into(), msg });
        }
        if inputs.is_null() && n_in > 0 {
            return Err(CapiError::Null("inputs"));
        }
        if outputs.is_null() && n_out > 0 {
            return Err(CapiError::Null("outputs"));
        }
        for (i, m) in e.inputs.iter().enumerate() {
            // SAFETY: `inputs` holds `n_in` buffers (caller contract) and `i < n_in`.
            let raw = unsafe { Raw::input(inputs, i) };
            // SAFETY: names are NUL-terminated (caller contract).
            unsafe { raw.check(m) }.map_err(|msg| CapiError::Input { entry: entry(), index: i, name: m.name().into(), msg })?;
        }
        for (i, m) in e.outputs.iter().enumerate() {
            // SAFETY: `outputs` holds `n_out` buffers (caller contract) and `i < n_out`.
            let raw = unsafe { Raw::output(outputs, i) };
            // SAFETY: names are NUL-terminated (caller contract).
            unsafe { raw.check(m) }.map_err(|msg| CapiError::Output { entry: entry(), index: i, name: m.name().into(), msg })?;
            // Writing through an output that aliases another buffer would break the
            // exclusive-access rule the kernels rely on.
            for j in 0..n_in {
                // SAFETY: `j < n_in`, as above.
                if overlaps(raw.range(), unsafe { Raw::input(inputs, j) }.range()) {
                    let msg = format!("the buffer overlaps input {j} ('{}')", e.inputs[j].name());
                    return Err(CapiError::Output { entry: entry(), index: i, name: m.name().into(), msg });
                }
            }
            for j in 0..i {
                // SAFETY: `j < i < n_out`, as above.
                if overlaps(raw.range(), unsafe { Raw::output(outputs, j) }.range()) {
                    let msg = format!("the buffer overlaps output {j} ('{}')", e.outputs[j].name());
                    return Err(CapiError::Output { entry: entry(), index: i, name: m.name().into(), msg });
                }
            }
        }
        let mut session = self.session.lock().map_err(|_| CapiError::Poisoned)?;
        if n_in <= STACK_IO && n_out <= STACK_IO {
            let mut ins: [&[u8]; STACK_IO] = [&[]; STACK_IO];
            let mut outs: [&mut [u8]; STACK_IO] = std::array::from_fn(|_| <&mut [u8]>::default());
            // SAFETY: every buffer was checked above (sizes, non-NULL data, no overlaps) and
            // the caller guarantees the bytes are valid for the duration of this call.
            unsafe { views(inputs, outputs, &mut ins[..n_in], &mut outs[..n_out]) };
            session.run_into(ei, &ins[..n_in], &mut outs[..n_out])?;
        } else {
            let mut ins: Vec<&[u8]> = vec![&[]; n_in];
            let mut outs: Vec<&mut [u8]> = (0..n_out).map(|_| Default::default()).collect();
            // SAFETY: as above.
            unsafe { views(inputs, outputs, &mut ins, &mut outs) };
            session.run_into(ei, &ins, &mut outs)?;
        }
        Ok(())
    }
}

/// Fills `ins` and `outs` with slices over the caller's buffers.
///
/// # Safety
/// `inputs` and `outputs` hold at least `ins.len()` and `outs.len()` checked buffers whose
/// bytes stay valid, and outputs unaliased, for `'a`.
unsafe fn views<'a>(inputs: *const KilnInput, outputs: *const KilnOutput, ins: &mut [&'a [u8]], outs: &mut [&'a mut [u8]]) {
    for (i, slot) in ins.iter_mut().enumerate() {
        // SAFETY: `i` is in bounds (caller contract).
        let raw = unsafe { Raw::input(inputs, i) };
        if raw.bytes > 0 {
            // SAFETY: checked non-NULL with `bytes` readable bytes (caller contract).
            *slot = unsafe { std::slice::from_raw_parts(raw.data, raw.bytes) };
        }
    }
    for (i, slot) in outs.iter_mut().enumerate() {
        // SAFETY: `i` is in bounds (caller contract).
        let raw = unsafe { Raw::output(outputs, i) };
        if raw.bytes > 0 {
            // SAFETY: checked non-NULL, writable and overlapping no other buffer (caller contract).
            *slot = unsafe { std::slice::from_raw_parts_mut(raw.data.cast_mut(), raw.bytes) };
        }
    }
}

// One session may be shared by threads: queries read immutable metadata, runs take the lock.
const _: () = {
    const fn shareable<T: Send + Sync>() {}
    shareable::<KilnSession>()
};
