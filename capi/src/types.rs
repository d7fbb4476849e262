//! The C-visible types: status codes, element types, tensor descriptions and buffers.

use std::ffi::c_char;
use std::ffi::c_void;

/// What a kiln call returned. `KILN_STATUS_OK` is success; every other value comes with a
/// message from `kiln_last_error()`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KilnStatus {
    /// Success.
    Ok = 0,
    /// A pointer argument that must not be NULL was NULL.
    NullPointer = 1,
    /// An argument is out of range or malformed (an index, a string that is not UTF-8,
    /// overlapping output buffers).
    InvalidArgument = 2,
    /// The caller was compiled against a header of another ABI version.
    AbiVersion = 3,
    /// A file could not be read.
    Io = 4,
    /// The artifact is not a kiln artifact, or is corrupt or inconsistent.
    Artifact = 5,
    /// The artifact was written by another artifact format version.
    ArtifactVersion = 6,
    /// The weights file is malformed or does not match the artifact.
    Weights = 7,
    /// The artifact needs a backend this build does not have.
    Unsupported = 8,
    /// No entry of the artifact has the given name.
    UnknownEntry = 9,
    /// An input buffer does not match its declaration (count, name, dtype, byte size).
    Input = 10,
    /// An output buffer does not match its declaration (count, name, dtype, byte size).
    Output = 11,
    /// A step of the program failed while running.
    Run = 12,
    /// An internal error (a Rust panic) was caught at the boundary; close the session.
    Panic = 13,
}

/// The element type of a tensor. Values are little-endian, densely packed, row-major.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KilnDtype {
    /// 32-bit IEEE float.
    F32 = 0,
    /// 16-bit IEEE float.
    F16 = 1,
    /// bfloat16.
    Bf16 = 2,
    /// 32-bit signed integer.
    I32 = 3,
    /// 64-bit signed integer.
    I64 = 4,
    /// 8-bit unsigned integer.
    U8 = 5,
    /// One byte, 0 or 1.
    Bool = 6,
}

impl KilnDtype {
    /// The C value for a kiln dtype.
    pub fn from_dtype(d: kiln_graph::DType) -> Self {
        use kiln_graph::DType;
        match d {
            DType::F32 => KilnDtype::F32,
            DType::F16 => KilnDtype::F16,
            DType::BF16 => KilnDtype::Bf16,
            DType::I32 => KilnDtype::I32,
            DType::I64 => KilnDtype::I64,
            DType::U8 => KilnDtype::U8,
            DType::Bool => KilnDtype::Bool,
        }
    }

    /// The short name (`f32`, `bf16`, ...), for messages.
    pub fn name(self) -> &'static str {
        match self {
            KilnDtype::F32 => "f32",
            KilnDtype::F16 => "f16",
            KilnDtype::Bf16 => "bf16",
            KilnDtype::I32 => "i32",
            KilnDtype::I64 => "i64",
            KilnDtype::U8 => "u8",
            KilnDtype::Bool => "bool",
        }
    }
}

/// One input or output of an entry, or one persistent state, as declared by the artifact.
/// The pointers are owned by the session and stay valid until `kiln_session_close`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KilnIoInfo {
    /// The name, NUL-terminated (`pixel_values`, `last_hidden_state`, ...).
    pub name: *const c_char,
    /// The element type.
    pub dtype: KilnDtype,
    /// The number of dimensions.
    pub rank: usize,
    /// `rank` dimensions, outermost first.
    pub shape: *const usize,
    /// The size in bytes of the whole tensor: what a buffer for it must hold exactly.
    pub bytes: usize,
}

/// A caller-owned input buffer for `kiln_session_run`. Buffers are given in the entry's
/// declared order.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KilnInput {
    /// NULL, or the declared name of the input at this position (checked when given).
    pub name: *const c_char,
    /// Must equal the declared dtype.
    pub dtype: KilnDtype,
    /// `bytes` readable bytes (may be NULL only when `bytes` is 0). NULL with `bytes` 0 for
    /// an input named like a state: the state is read in place.
    pub data: *const c_void,
    /// Must equal the declared size in bytes (or be 0 with `data` NULL, for a state).
    pub bytes: usize,
}

/// A caller-owned output buffer for `kiln_session_run`, written in place. Buffers are given in
/// the entry's declared order and must not overlap each other or any input.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KilnOutput {
    /// NULL, or the declared name of the output at this position (checked when given).
    pub name: *const c_char,
    /// Must equal the declared dtype.
    pub dtype: KilnDtype,
    /// `bytes` writable bytes (may be NULL only when `bytes` is 0). NULL with `bytes` 0 for
    /// an output named like a state: it is only stored in the state.
    pub data: *mut c_void,
    /// Must equal the declared size in bytes (or be 0 with `data` NULL, for a state).
    pub bytes: usize,
}
