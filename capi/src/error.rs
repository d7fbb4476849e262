//! Errors of the C ABI, their status codes, the thread's last error, and the guard that keeps
//! panics on the Rust side of the boundary.

use crate::types::KilnStatus;
use kiln_graph::artifact::ArtifactError;
use kiln_runtime::RuntimeError;
use std::cell::RefCell;
use std::ffi::{c_char, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use thiserror::Error;

/// What a C ABI call can fail with.
#[derive(Debug, Error)]
pub enum CapiError {
    /// A required pointer was NULL.
    #[error("argument '{0}' is NULL")]
    Null(&'static str),
    /// An argument is malformed or out of range.
    #[error("argument '{arg}': {msg}")]
    Invalid { arg: &'static str, msg: String },
    /// The caller's header and this library disagree on the ABI version.
    #[error(
        "the caller was compiled against kiln.h of ABI version {caller}, this library implements version {library}: \
         rebuild against the kiln.h shipped with this library"
    )]
    AbiVersion { caller: u32, library: u32 },
    /// An entry name the artifact does not have.
    #[error("no entry '{name}' in this artifact (it has: {have})")]
    UnknownEntry { name: String, have: String },
    /// An input buffer that does not match its declaration.
    #[error("entry '{entry}', input {index} ('{name}'): {msg}")]
    Input { entry: String, index: usize, name: String, msg: String },
    /// An output buffer that does not match its declaration.
    #[error("entry '{entry}', output {index} ('{name}'): {msg}")]
    Output { entry: String, index: usize, name: String, msg: String },
    /// A previous call panicked while holding the session.
    #[error("the session is unusable after an internal error in an earlier call: close it")]
    Poisoned,
    /// The runtime's error (loading, weights, running).
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

impl CapiError {
    /// The status code a C caller sees for this error.
    pub fn status(&self) -> KilnStatus {
        match self {
            CapiError::Null(_) => KilnStatus::NullPointer,
            CapiError::Invalid { .. } => KilnStatus::InvalidArgument,
            CapiError::AbiVersion { .. } => KilnStatus::AbiVersion,
            CapiError::UnknownEntry { .. } => KilnStatus::UnknownEntry,
            CapiError::Input { .. } => KilnStatus::Input,
            CapiError::Output { .. } => KilnStatus::Output,
            CapiError::Poisoned => KilnStatus::Panic,
            CapiError::Runtime(e) => runtime_status(e),
        }
    }
}

fn runtime_status(e: &RuntimeError) -> KilnStatus {
    match e {
        RuntimeError::Io { .. } => KilnStatus::Io,
        RuntimeError::Weights { .. } | RuntimeError::Weight { .. } => KilnStatus::Weights,
        RuntimeError::Input { .. } => KilnStatus::Input,
        RuntimeError::Output { .. } => KilnStatus::Output,
        RuntimeError::Entry { .. } => KilnStatus::UnknownEntry,
        RuntimeError::Unsupported { .. } => KilnStatus::Unsupported,
        RuntimeError::Invalid(_) => KilnStatus::Artifact,
        RuntimeError::Step { .. } | RuntimeError::Graph(_) | RuntimeError::Memory(_) => KilnStatus::Run,
        RuntimeError::Artifact(a) => match a {
            ArtifactError::Version { .. } => KilnStatus::ArtifactVersion,
            ArtifactError::Io { .. } => KilnStatus::Io,
            ArtifactError::NotKiln { .. }
            | ArtifactError::Truncated { .. }
            | ArtifactError::Trailing { .. }
            | ArtifactError::Checksum { .. }
            | ArtifactError::Parse { .. }
            | ArtifactError::Invalid { .. } => KilnStatus::Artifact,
        },
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Records `msg` as this thread's last error (interior NULs become spaces).
pub fn set_last_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    // Fails only while the thread is being torn down; there is nobody left to read it then.
    let _ = LAST_ERROR.try_with(|e| *e.borrow_mut() = c);
}

/// This thread's last error message: valid until the next failing kiln call on this thread.
pub fn last_error_ptr() -> *const c_char {
    // Outside thread teardown the thread-local is alive; during it, a static empty string.
    LAST_ERROR.try_with(|e| e.borrow().as_ptr()).unwrap_or(c"".as_ptr())
}

/// Runs `f`, turning its error or its panic into a status and this thread's last error.
pub fn guard(f: impl FnOnce() -> Result<(), CapiError>) -> KilnStatus {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => KilnStatus::Ok,
        Ok(Err(e)) => {
            set_last_error(&e.to_string());
            e.status()
        }
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic with no message".into());
            set_last_error(&format!("internal error in kiln (a bug; please report it): {msg}"));
            KilnStatus::Panic
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    fn last() -> String {
        // SAFETY: last_error_ptr always returns a valid NUL-terminated string.
        unsafe { CStr::from_ptr(last_error_ptr()) }.to_string_lossy().into_owned()
    }

    #[test]
    fn a_panic_becomes_a_status_and_a_message() {
        let s = guard(|| panic!("boom {}", 7));
        assert_eq!(s, KilnStatus::Panic);
        assert!(last().contains("boom 7"), "{}", last());
        let s = guard(|| std::panic::panic_any(3u8));
        assert_eq!(s, KilnStatus::Panic);
        assert!(last().contains("no message"));
    }

    #[test]
    fn errors_set_the_message_and_success_keeps_it() {
        assert_eq!(guard(|| Err(CapiError::Null("out"))), KilnStatus::NullPointer);
        assert_eq!(last(), "argument 'out' is NULL");
        assert_eq!(guard(|| Ok(())), KilnStatus::Ok);
        assert_eq!(last(), "argument 'out' is NULL");
        set_last_error("a\0b");
        assert_eq!(last(), "a b");
    }
}
