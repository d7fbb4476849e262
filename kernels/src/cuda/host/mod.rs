//! kiln's CUDA C kernels run on the CPU, for tests without a GPU: a module's source is
//! compiled by the system C++ compiler against a shim (`shim.h`: CUDA's qualifiers, built-in
//! indices, intrinsics, and the threads of a block as cooperative fibers switched at barriers
//! and warp collectives; `ptx.h`: host versions of the inline PTX, the tensor-core `mma.sync`
//! and `ldmatrix` as warp collectives), loaded with dlopen, and launched block after block.
//!
//! What it is not: blocks never run at the same time (a kernel that spins until another
//! block writes never ends), there is no memory model (fibers switch only at `__syncthreads`, warp
//! collectives and exits, so a race between threads of a block that the GPU would expose is
//! hidden), atomics are plain read-modify-writes, and cuBLASLt is not emulated. Launches are
//! serialized process-wide.

mod rewrite;

pub use rewrite::PTX;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// The fiber runtime and CUDA's built-ins for the host (prepended to every module).
pub const SHIM: &str = include_str!("shim.h");
/// Host versions of the inline PTX (after [`SHIM`]).
pub const PTX_SHIM: &str = include_str!("ptx.h");
/// Ends the shim: the rewrites touch only the text after it.
const MARKER: &str = "struct kiln_host_source_begin {};";
/// Flags of the final compilation (strict aliasing off: the kernels pun through pointer casts;
/// no FMA contraction, so results do not depend on the compiler's choices).
const CXX_FLAGS: &[&str] =
    &["-std=c++17", "-O1", "-fPIC", "-shared", "-fvisibility=hidden", "-fno-strict-aliasing", "-ffp-contract=off", "-w"];

extern "C" {
    fn dlopen(filename: *const c_char, flag: c_int) -> *mut c_void;
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
    fn dlclose(handle: *mut c_void) -> c_int;
    fn dlerror() -> *const c_char;
}
const RTLD_NOW: c_int = 2;

/// The C++ compiler: `$CXX`, else `g++`, else `c++`, whichever runs (looked up once).
fn compiler() -> Option<String> {
    static CXX: OnceLock<Option<String>> = OnceLock::new();
    let runs = |c: &str| Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success());
    CXX.get_or_init(|| std::env::var("CXX").ok().into_iter().chain(["g++".to_string(), "c++".to_string()]).find(|c| runs(c))).clone()
}

/// Whether a C++ compiler (`$CXX` or `g++`/`c++`) is found.
pub fn available() -> bool {
    compiler().is_some()
}

/// The directory of compiled modules: `$KILN_CUDA_HOST_CACHE`, else `<temp>/kiln-cuda-host`.
fn cache_dir() -> PathBuf {
    std::env::var_os("KILN_CUDA_HOST_CACHE").map(PathBuf::from).unwrap_or_else(|| std::env::temp_dir().join("kiln-cuda-host"))
}

/// FNV-1a over the parts (stable across Rust versions, unlike `DefaultHasher`).
fn fnv(parts: &[&str]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for p in parts {
        for &b in p.as_bytes().iter().chain([0xffu8].iter()) {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

fn run(cmd: &mut Command, what: &str) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let log = String::from_utf8_lossy(&out.stderr);
    let log: String = log.lines().take(40).collect::<Vec<_>>().join("\n");
    Err(format!("{what} failed:\n{log}"))
}

/// Compiles `source` into the shared object `so` (through files beside it named by `tmp`).
fn build(cxx: &str, source: &str, so: &Path, tmp: &str) -> Result<(), String> {
    let dir = so.parent().ok_or("cache path without a directory")?;
    let (cu, ii, cpp, part) =
        (dir.join(format!("{tmp}.cu.cpp")), dir.join(format!("{tmp}.ii")), dir.join(format!("{tmp}.cpp")), dir.join(format!("{tmp}.so")));
    std::fs::write(&cu, format!("{SHIM}\n{PTX_SHIM}\n{MARKER}\n# 1 \"module.cu\"\n{source}\n"))
        .map_err(|e| format!("{}: {e}", cu.display()))?;
    run(Command::new(cxx).args(["-E", "-x", "c++", "-std=c++17"]).arg(&cu).arg("-o").arg(&ii), "preprocessing")?;
    let text = std::fs::read_to_string(&ii).map_err(|e| format!("{}: {e}", ii.display()))?;
    let (host, _) = rewrite::host_source(&text, MARKER)?;
    std::fs::write(&cpp, host).map_err(|e| format!("{}: {e}", cpp.display()))?;
    run(Command::new(cxx).args(["-x", "c++-cpp-output"]).arg(&cpp).args(CXX_FLAGS).arg("-o").arg(&part), "compiling")?;
    for f in [&cu, &ii, &cpp] {
        let _ = std::fs::remove_file(f);
    }
    // Another process may have built the same object meanwhile: the rename replaces it whole.
    std::fs::rename(&part, so).map_err(|e| format!("{}: {e}", so.display()))
}

/// The launch entry of `shim.h`.
type LaunchFn = unsafe extern "C" fn(unsafe extern "C" fn(*const c_void), *const c_void, u32, u32, u32, u32, u32) -> *const c_char;

/// Launches run one at a time: `__shared__` variables, the built-in indices and the fiber
/// stacks are each module's globals.
static LAUNCH: Mutex<()> = Mutex::new(());

/// A module's CUDA C source compiled for this CPU (a shared object loaded with dlopen; cached
/// by a hash of the source under `$KILN_CUDA_HOST_CACHE` or `<temp>/kiln-cuda-host`).
pub struct HostModule {
    handle: *mut c_void,
    launch: LaunchFn,
}

// SAFETY: the handle is only used with dlsym (thread-safe) and launches hold `LAUNCH`.
unsafe impl Send for HostModule {}
// SAFETY: as for Send.
unsafe impl Sync for HostModule {}

/// The address of `name` in the loaded object `handle`.
fn symbol(handle: *mut c_void, name: &str) -> Option<*mut c_void> {
    let c = CString::new(name).ok()?;
    // SAFETY: a live handle from dlopen and a NUL-terminated name.
    let p = unsafe { dlsym(handle, c.as_ptr()) };
    (!p.is_null()).then_some(p)
}

fn dl_error() -> String {
    // SAFETY: dlerror returns null or a NUL-terminated string valid until the next dl call.
    unsafe {
        let e = dlerror();
        if e.is_null() {
            "unknown dl error".into()
        } else {
            CStr::from_ptr(e).to_string_lossy().into_owned()
        }
    }
}

impl HostModule {
    /// Compiles (or finds in the cache) and loads a module's CUDA C source (`Module::source`,
    /// or a generated region's source).
    pub fn compile(source: &str) -> Result<HostModule, String> {
        let cxx = compiler().ok_or("no C++ compiler ($CXX, g++ or c++) found")?;
        let hash = fnv(&[SHIM, PTX_SHIM, source, &CXX_FLAGS.join(" "), &cxx]);
        let dir = cache_dir();
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let so = dir.join(format!("{hash:016x}.so"));
        if !so.exists() {
            static N: AtomicU64 = AtomicU64::new(0);
            let tmp = format!("{hash:016x}.{}.{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
            build(&cxx, source, &so, &tmp)?;
        }
        let cpath = CString::new(so.as_os_str().as_encoded_bytes()).map_err(|_| "cache path holds a NUL byte")?;
        // SAFETY: loads a shared object this function built from kiln's shim and the source;
        // its initializers only zero globals.
        let handle = unsafe { dlopen(cpath.as_ptr(), RTLD_NOW) };
        if handle.is_null() {
            return Err(format!("dlopen {}: {}", so.display(), dl_error()));
        }
        let Some(sym) = symbol(handle, "kiln_host_launch") else {
            // SAFETY: the handle just opened, closed once.
            unsafe { dlclose(handle) };
            return Err(format!("{}: no kiln_host_launch", so.display()));
        };
        // SAFETY: `kiln_host_launch` in shim.h has exactly the signature of LaunchFn.
        let launch = unsafe { std::mem::transmute::<*mut c_void, LaunchFn>(sym) };
        Ok(HostModule { handle, launch })
    }

    /// Whether the module defines kernel `kernel`.
    pub fn has(&self, kernel: &str) -> bool {
        symbol(self.handle, &format!("{kernel}{}", rewrite::WRAPPER_SUFFIX)).is_some()
    }

    /// Runs `kernel` over `grid` blocks of `block` threads with `smem` bytes of dynamic shared
    /// memory; `params` is the kernel's by-value parameter struct's bytes (device addresses in
    /// it are plain host pointers the caller wrote). Blocks run one after another.
    ///
    /// # Safety
    /// The addresses in `params` must be valid for what the kernel touches, and `params` must
    /// be the bytes of the kernel's parameter struct.
    pub unsafe fn launch(&self, kernel: &str, grid: (u32, u32, u32), block: u32, smem: u32, params: &[u8]) -> Result<(), String> {
        let sym = symbol(self.handle, &format!("{kernel}{}", rewrite::WRAPPER_SUFFIX))
            .ok_or_else(|| format!("no kernel {kernel} in the module"))?;
        // SAFETY: the wrappers rewrite.rs appends are `void NAME__kiln_host(const void*)`.
        let entry = unsafe { std::mem::transmute::<*mut c_void, unsafe extern "C" fn(*const c_void)>(sym) };
        // 16-byte aligned, as the by-value struct is on the device.
        let mut aligned = vec![0u128; params.len().div_ceil(16).max(1)];
        // SAFETY: `aligned` holds at least params.len() bytes.
        unsafe { std::ptr::copy_nonoverlapping(params.as_ptr(), aligned.as_mut_ptr().cast::<u8>(), params.len()) };
        let _guard = LAUNCH.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the caller vouches for the addresses in params; launch is shim.h's entry.
        let err = unsafe { (self.launch)(entry, aligned.as_ptr().cast(), grid.0, grid.1, grid.2, block, smem) };
        if err.is_null() {
            return Ok(());
        }
        // SAFETY: the shim returns static NUL-terminated messages.
        Err(format!("{kernel}: {}", unsafe { CStr::from_ptr(err) }.to_string_lossy()))
    }
}

impl Drop for HostModule {
    fn drop(&mut self) {
        // SAFETY: a handle from dlopen, closed once (dlopen counts references per object).
        unsafe { dlclose(self.handle) };
    }
}
