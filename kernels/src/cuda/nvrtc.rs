//! Compiling kernels with NVRTC (loaded at run time through cudarc) to CUBINs, with ptxas's
//! resource report (registers, shared memory, spills) parsed per kernel. Needs no GPU: the
//! `nvidia-cuda-nvrtc` wheel's `libnvrtc.so.13` is enough.

use cudarc::nvrtc::{result, sys};
use std::ffi::{c_char, CString};

/// What NVRTC needs and how to get it, for error messages.
pub const INSTALL_HINT: &str = "libnvrtc was not found: install it with \
`python3 -m pip install --target .nvrtc nvidia-cuda-nvrtc==13.0.88` and set \
`LD_LIBRARY_PATH=$PWD/.nvrtc/nvidia/cu13/lib` (or install a CUDA 13 toolkit)";

/// Whether libnvrtc can be loaded (cudarc panics on the first call without it).
pub fn available() -> bool {
    // SAFETY: only tries to dlopen the library by its candidate names.
    unsafe { sys::is_culib_present() }
}

/// ptxas's figures for one kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    pub registers: u32,
    /// Static shared memory, bytes (dynamic shared memory is set at launch).
    pub smem: u32,
    pub stack: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
}

/// A compiled module: the CUBIN, the full log and each kernel's resources (in log order).
#[derive(Clone, Debug)]
pub struct Compiled {
    pub cubin: Vec<u8>,
    pub log: String,
    pub kernels: Vec<(String, Resources)>,
}

/// The NVRTC options kiln compiles with for `arch` (`sm_90a`, ...).
pub fn options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        "--ptxas-options=-v".into(),
        "--fmad=true".into(),
        "-default-device".into(),
    ]
}

fn text(v: Vec<c_char>) -> String {
    let bytes: Vec<u8> = v.into_iter().map(|c| c as u8).take_while(|&c| c != 0).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Compiles `source` (named `name` in messages) for `arch` to a CUBIN. The error is NVRTC's
/// log (compile errors with line numbers).
pub fn compile(name: &str, source: &str, arch: &str) -> Result<Compiled, String> {
    if !available() {
        return Err(INSTALL_HINT.to_string());
    }
    let src = CString::new(source).map_err(|_| format!("{name}: source holds a NUL byte"))?;
    let cname = CString::new(format!("{name}.cu")).map_err(|_| format!("{name}: name holds a NUL byte"))?;
    let prog = result::create_program(&src, Some(&cname)).map_err(|e| format!("{name}: nvrtcCreateProgram: {e}"))?;
    // SAFETY: `prog` was just created and is destroyed once below; `src` and `cname` outlive it.
    let out = unsafe {
        let compiled = result::compile_program(prog, &options(arch));
        let log = result::get_program_log(prog).map(text).unwrap_or_default();
        let out = match compiled {
            Err(e) => Err(format!("{name}: {e}\n{log}")),
            Ok(()) => cubin(prog)
                .map(|cubin| Compiled { cubin, kernels: parse_log(&log), log })
                .map_err(|e| format!("{name}: nvrtcGetCUBIN: {e}")),
        };
        let _ = result::destroy_program(prog);
        out
    };
    out
}

/// Compiles `source` for the virtual architecture `compute` (`compute_90a`) to PTX text, the
/// code NVRTC hands ptxas (the checks of `pdl::order` read it).
pub fn ptx(name: &str, source: &str, compute: &str) -> Result<String, String> {
    if !available() {
        return Err(INSTALL_HINT.to_string());
    }
    let src = CString::new(source).map_err(|_| format!("{name}: source holds a NUL byte"))?;
    let cname = CString::new(format!("{name}.cu")).map_err(|_| format!("{name}: name holds a NUL byte"))?;
    let prog = result::create_program(&src, Some(&cname)).map_err(|e| format!("{name}: nvrtcCreateProgram: {e}"))?;
    let opts: Vec<String> = options(compute).into_iter().filter(|o| !o.starts_with("--ptxas-options")).collect();
    // SAFETY: `prog` was just created and is destroyed once below; `src` and `cname` outlive it.
    unsafe {
        let out = match result::compile_program(prog, &opts) {
            Err(e) => Err(format!("{name}: {e}\n{}", result::get_program_log(prog).map(text).unwrap_or_default())),
            Ok(()) => result::get_ptx(prog).map(text).map_err(|e| format!("{name}: nvrtcGetPTX: {e}")),
        };
        let _ = result::destroy_program(prog);
        out
    }
}

/// FNV-1a over the compile inputs: the key of a cached CUBIN.
fn cache_key(name: &str, source: &str, arch: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in [name, arch, &options(arch).join(" "), source] {
        for b in part.bytes().chain([0u8]) {
            h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{name}-{arch}-{h:016x}")
}

fn memory_cache() -> &'static std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>> {
    static CACHE: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>> = std::sync::OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// The folder of the on-disk CUBIN cache: `$KILN_CUDA_CACHE`, if set.
fn disk_cache() -> Option<std::path::PathBuf> {
    std::env::var_os("KILN_CUDA_CACHE").filter(|v| !v.is_empty()).map(Into::into)
}

/// Stores a CUBIN compiled from (`name`, `source`, `arch`) in the process's cache and, when
/// `KILN_CUDA_CACHE` names a folder, on disk (so a later process skips NVRTC).
pub fn remember(name: &str, source: &str, arch: &str, cubin: &[u8]) {
    let key = cache_key(name, source, arch);
    if let Some(dir) = disk_cache() {
        let tmp = dir.join(format!("{key}.tmp{}", std::process::id()));
        let ok = std::fs::create_dir_all(&dir)
            .and_then(|_| std::fs::write(&tmp, cubin))
            .and_then(|_| std::fs::rename(&tmp, dir.join(format!("{key}.cubin"))));
        if let Err(e) = ok {
            eprintln!("kiln: could not write the CUBIN cache in {}: {e}", dir.display());
        }
    }
    memory_cache().lock().unwrap_or_else(|e| e.into_inner()).insert(key, cubin.to_vec());
}

/// [`compile`]'s CUBIN, from the cache when the same source was compiled for `arch` before
/// (in this process, or on disk under `KILN_CUDA_CACHE`). Loading a program compiles every
/// hand-written module, so without this each load would spend seconds in NVRTC.
pub fn compile_cached(name: &str, source: &str, arch: &str) -> Result<Vec<u8>, String> {
    let key = cache_key(name, source, arch);
    if let Some(c) = memory_cache().lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(c.clone());
    }
    if let Some(bytes) = disk_cache().and_then(|d| std::fs::read(d.join(format!("{key}.cubin"))).ok()) {
        memory_cache().lock().unwrap_or_else(|e| e.into_inner()).insert(key, bytes.clone());
        return Ok(bytes);
    }
    let c = compile(name, source, arch)?;
    remember(name, source, arch, &c.cubin);
    Ok(c.cubin)
}

/// # Safety
/// `prog` must be a live, compiled program.
unsafe fn cubin(prog: sys::nvrtcProgram) -> Result<Vec<u8>, result::NvrtcError> {
    let mut size = 0usize;
    // SAFETY: per the caller; `size` is a valid out pointer.
    unsafe { sys::nvrtcGetCUBINSize(prog, &mut size).result()? };
    let mut buf = vec![0 as c_char; size];
    // SAFETY: `buf` holds the `size` bytes NVRTC reported.
    unsafe { sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr()).result()? };
    Ok(buf.into_iter().map(|c| c as u8).collect())
}

fn number_before(line: &str, unit: &str) -> Option<u32> {
    let at = line.find(unit)?;
    line[..at].split_whitespace().last()?.parse().ok()
}

/// Reads ptxas `-v` output: `Function properties for K` / `N bytes stack frame, N bytes spill
/// stores, N bytes spill loads` / `Used N registers, ..., N bytes smem`.
pub fn parse_log(log: &str) -> Vec<(String, Resources)> {
    let mut out: Vec<(String, Resources)> = Vec::new();
    let mut current: Option<usize> = None;
    let find = |out: &mut Vec<(String, Resources)>, name: &str| match out.iter().position(|(n, _)| n == name) {
        Some(i) => i,
        None => {
            out.push((name.to_string(), Resources::default()));
            out.len() - 1
        }
    };
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or("");
            current = Some(find(&mut out, name));
        } else if let Some(rest) = line.split("Function properties for ").nth(1) {
            current = Some(find(&mut out, rest.trim()));
        } else if let Some(i) = current {
            let r = &mut out[i].1;
            if line.contains("bytes stack frame") {
                r.stack = number_before(line, "bytes stack frame").unwrap_or(0);
                r.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
                r.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used ") && line.contains("registers") {
                r.registers = number_before(line, "registers").unwrap_or(0);
                r.smem = number_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_keys_change_with_every_input() {
        let k = cache_key("attention", "a", "sm_90a");
        assert_eq!(k, cache_key("attention", "a", "sm_90a"));
        assert_ne!(k, cache_key("attention", "b", "sm_90a"));
        assert_ne!(k, cache_key("attention", "a", "sm_80"));
        assert_ne!(k, cache_key("data", "a", "sm_90a"));
        assert!(k.starts_with("attention-sm_90a-"));
    }

    #[test]
    fn reads_a_ptxas_report() {
        let log = "ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'attn_rows_f32' for 'sm_90a'\n\
ptxas info    : Function properties for attn_rows_f32\n\
    8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads\n\
ptxas info    : Used 40 registers, used 1 barriers, 4128 bytes smem, 488 bytes cmem[0]\n";
        let k = parse_log(log);
        assert_eq!(k.len(), 1);
        assert_eq!(k[0].0, "attn_rows_f32");
        assert_eq!(k[0].1, Resources { registers: 40, smem: 4128, stack: 8, spill_stores: 12, spill_loads: 16 });
    }
}
