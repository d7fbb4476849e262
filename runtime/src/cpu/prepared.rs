//! The prepared weight file (`<artifact>.weights`): every weight of a cpu program in the
//! layout the kernels read, written once by `kiln compile` and mapped at load, so a load packs
//! nothing, converts nothing and copies nothing.
//!
//! Layout, integers little-endian:
//!
//! | offset | bytes | field                                                     |
//! |--------|-------|-----------------------------------------------------------|
//! | 0      | 8     | magic `KILN\0WTS`                                         |
//! | 8      | 4     | format version, u32 ([`VERSION`])                         |
//! | 12     | 4     | zero                                                      |
//! | 16     | 8     | header length `h`, u64                                    |
//! | 24     | 8     | XXH3-64 of the header                                     |
//! | 32     | 8     | file length, u64 (a truncated file is refused by it)      |
//! | 40     | h     | header (below)                                            |
//! | ...    |       | tensors, each at a multiple of 4096 (page-aligned in the map) |
//!
//! Header: the program's identity (XXH3-64 of its artifact bytes, so a recompiled artifact
//! refuses the file), the profile string ([`profile`]: backend, packed-layout version, whether
//! the CPU packs at all), the checkpoint files it was made from (path, size and a sampled
//! hash, so a checkpoint rewritten since is noticed), then one record per tensor: a weight as
//! the program reads it (its dtype, raw; or the checkpoint's bf16 bits of an f32 weight that
//! only gathers read, which widen the rows they copy: an embedding table stays half the size)
//! or one packed matrix of a weight (`[n/32][k][32]` panels, f32 or the checkpoint's bf16
//! bits), each with its offset, length and XXH3-64. Version 2 added the bf16 raw weight.
//!
//! Verification rule: the header is always checked; every tensor's checksum is checked at
//! load, in parallel over the tensors (XXH3 runs at memory speed, and a forward pass reads
//! every weight anyway, so this costs one extra read of the file: see BENCHMARKS.md).

use super::exec::{self, PackCache};
use super::{Aligned, Read, WeightBuf};
use crate::error::{Result, RuntimeError};
use crate::weights::WeightStore;
use kiln_graph::program::{Program, Slot};
use kiln_graph::DType;
use kiln_kernels::cpu::sgemm512::{self, PackedB, PanelBytes};
use memmap2::Mmap;
use rayon::prelude::*;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use xxhash_rust::xxh3::xxh3_64;

/// The first eight bytes of a prepared weight file.
pub const MAGIC: &[u8; 8] = b"KILN\0WTS";
/// The layout this kiln writes and reads.
pub const VERSION: u32 = 2;
/// Tensor alignment in the file (a page: the map hands out page-aligned addresses).
const ALIGN: u64 = 4096;
const FIXED: usize = 40;

/// Where the prepared weight file of an artifact lies: beside it, `<artifact>.weights`.
pub fn path_for(artifact: &Path) -> PathBuf {
    let mut p = artifact.as_os_str().to_owned();
    p.push(".weights");
    PathBuf::from(p)
}

/// What the file's layout depends on besides the program: the backend, the packed-panel
/// layout, and whether this CPU packs at all (only with AVX-512F).
pub fn profile(program: &Program) -> String {
    let packs = if sgemm512::available() { "packed for AVX-512F" } else { "no packing (no AVX-512F)" };
    format!("backend {}; {}; {packs}", program.backend, sgemm512::LAYOUT)
}

/// The program's identity: a hash of its artifact bytes.
pub fn identity(program: &Program) -> u64 {
    xxh3_64(&kiln_graph::artifact::save(program))
}

/// A mapped prepared file, shared by the weight store and every packed matrix read from it.
#[derive(Debug)]
pub struct Mapped(Mmap);

impl PanelBytes for Mapped {
    fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// One tensor of the file.
#[derive(Clone, Debug, PartialEq)]
struct Record {
    /// Packed panels (else the weight's bytes as the program reads them).
    packed: bool,
    weight: u32,
    /// Packed: the product transposes the weight; which matrix of a batched weight. Packed or
    /// raw: bf16 bits (a raw one is an f32 weight read only by gathers).
    transposed: bool,
    bf16: bool,
    batch: u32,
    k: u64,
    n: u64,
    offset: u64,
    len: u64,
    hash: u64,
}

/// What one tensor of a prepared file is ([`PreparedFile::tensors`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// The program's weight it holds (an index into `Program::weights`).
    pub weight: u32,
    /// Packed panels of the weight, else the weight as a step reads it.
    pub packed: bool,
    /// bf16 bits (the weight is f32 in the program).
    pub bf16: bool,
    /// Its length in the file.
    pub bytes: u64,
}

/// A checkpoint file the prepared file was made from.
#[derive(Clone, Debug, PartialEq)]
struct Checkpoint {
    path: String,
    size: u64,
    sampled: u64,
}

/// A prepared weight file, opened and checked against a program.
#[derive(Debug)]
pub struct PreparedFile {
    /// Where it lies.
    pub path: PathBuf,
    pub(crate) map: Arc<Mapped>,
    records: Vec<Record>,
    checkpoints: Vec<Checkpoint>,
}

/// The size and a hash of 64 KiB at each end and 62 blocks of 4 KiB spread between: reads
/// under 400 KiB however large the file, and any re-save of other weights changes it.
fn fingerprint(path: &Path) -> std::io::Result<Checkpoint> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path)?;
    let size = f.metadata()?.len();
    let mut spans = vec![(0, 65536.min(size)), (size.saturating_sub(65536), 65536.min(size))];
    spans.extend((1..=62).map(|i| (size / 63 * i, 4096.min(size - size / 63 * i))));
    let mut buf = Vec::new();
    for (at, len) in spans {
        let start = buf.len();
        buf.resize(start + len as usize, 0);
        f.read_exact_at(&mut buf[start..], at)?;
    }
    let path = std::fs::canonicalize(path)?.display().to_string();
    Ok(Checkpoint { path, size, sampled: xxh3_64(&buf) })
}

/// The checkpoint files a weight path names (a folder's weight files, or the file).
fn checkpoint_files(p: &Path) -> Vec<PathBuf> {
    let files = if p.is_dir() { kiln_graph::safetensors::weight_files(p).unwrap_or_default() } else { vec![p.to_path_buf()] };
    files.iter().filter_map(|f| std::fs::canonicalize(f).ok()).collect()
}

/// What writing a prepared file did.
#[derive(Clone, Debug)]
pub struct Written {
    /// Bytes written.
    pub bytes: u64,
    /// Packed matrices and raw weights stored.
    pub packed: usize,
    pub raw: usize,
}

/// Loads `program` from `weights` the ordinary way (packing every matmul weight) and writes
/// what the load made to `out`, atomically (a `.tmp` file renamed over it), with progress.
pub fn write(program: &Program, weights: Arc<WeightStore>, out: &Path) -> Result<Written> {
    if program.backend != "cpu" {
        return Err(RuntimeError::Unsupported {
            backend: program.backend.clone(),
            msg: "prepared weight files are written for the cpu backend only".into(),
        });
    }
    let ex = super::build(program, weights.clone())?;
    let read = super::reads(program, &ex.prepared);
    // Tensors in order: each raw weight some step reads as it is, then each packed matrix.
    let mut tensors: Vec<(Record, &[u8])> = Vec::new();
    for (i, spec) in program.weights.iter().enumerate() {
        if read[i] == Read::Packed {
            continue;
        }
        let (bytes, bf16): (&[u8], bool) = match &ex.wbufs[i] {
            WeightBuf::Mapped { start, file } => (&weights.map_bytes(*file)[*start..*start + spec.ty.bytes()], false),
            WeightBuf::Owned(a) => (a.bytes(), false),
            WeightBuf::Bf16 { start, file } => (&weights.map_bytes(*file)[*start..*start + spec.ty.numel() * 2], true),
        };
        let r = Record {
            packed: false,
            weight: i as u32,
            transposed: false,
            bf16,
            batch: 0,
            k: 0,
            n: 0,
            offset: 0,
            len: bytes.len() as u64,
            hash: 0,
        };
        tensors.push((r, bytes));
    }
    let mut seen = std::collections::HashSet::new();
    for (e, preps) in program.entries.iter().zip(&ex.prepared) {
        for (s, p) in e.steps.iter().zip(preps) {
            let (exec::Prep::MatMul { packed, .. }, Slot::Weight(w)) = (&p.prep, s.inputs.get(1).map(|o| o.slot).unwrap_or(Slot::Const(0)))
            else {
                continue;
            };
            let Some(transpose_b) = super::pack::transpose_b(&s.op) else { continue };
            if packed.is_empty() || !seen.insert((w, transpose_b)) {
                continue;
            }
            for (b, m) in packed.iter().enumerate() {
                let (raw, bf16) = m.raw();
                let r = Record {
                    packed: true,
                    weight: w,
                    transposed: transpose_b,
                    bf16,
                    batch: b as u32,
                    k: m.k as u64,
                    n: m.n as u64,
                    offset: 0,
                    len: raw.len() as u64,
                    hash: 0,
                };
                tensors.push((r, raw));
            }
        }
    }
    let hashed = AtomicU64::new(0);
    let total: u64 = tensors.iter().map(|(r, _)| r.len).sum();
    tensors.par_iter_mut().for_each(|(r, b)| {
        r.hash = xxh3_64(b);
        crate::progress::report("hashing prepared weights", hashed.fetch_add(r.len, Ordering::Relaxed) + r.len, total);
    });
    let mut seen_paths = std::collections::HashSet::new();
    let mut checkpoints = Vec::new();
    for p in &weights.paths {
        if seen_paths.insert(p.clone()) {
            checkpoints.push(fingerprint(p).map_err(|source| RuntimeError::Io { path: p.clone(), source })?);
        }
    }
    // The header's length does not depend on the offsets, so lay out once with zeros.
    let mut records: Vec<Record> = tensors.iter().map(|(r, _)| r.clone()).collect();
    let h = header(program, &checkpoints, &records).len();
    let mut at = (FIXED + h) as u64;
    for r in &mut records {
        at = at.next_multiple_of(ALIGN);
        r.offset = at;
        at += r.len;
    }
    let head = header(program, &checkpoints, &records);
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| RuntimeError::Io { path: p, source }
    };
    let mut tmp = out.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    let mut w = std::io::BufWriter::with_capacity(8 << 20, file);
    let mut fixed = Vec::with_capacity(FIXED);
    fixed.extend_from_slice(MAGIC);
    fixed.extend_from_slice(&VERSION.to_le_bytes());
    fixed.extend_from_slice(&0u32.to_le_bytes());
    fixed.extend_from_slice(&(head.len() as u64).to_le_bytes());
    fixed.extend_from_slice(&xxh3_64(&head).to_le_bytes());
    fixed.extend_from_slice(&at.to_le_bytes());
    let result = (|| -> std::io::Result<()> {
        w.write_all(&fixed)?;
        w.write_all(&head)?;
        let mut pos = (FIXED + head.len()) as u64;
        for (r, (_, bytes)) in records.iter().zip(&tensors) {
            w.write_all(&vec![0; (r.offset - pos) as usize])?;
            w.write_all(bytes)?;
            pos = r.offset + r.len;
            crate::progress::report("writing prepared weights", pos, at);
        }
        w.flush()
    })();
    if let Err(e) = result.and_then(|_| std::fs::rename(&tmp, out)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(RuntimeError::Io { path: out.to_path_buf(), source: e });
    }
    Ok(Written { bytes: at, packed: records.iter().filter(|r| r.packed).count(), raw: records.iter().filter(|r| !r.packed).count() })
}

fn header(program: &Program, checkpoints: &[Checkpoint], records: &[Record]) -> Vec<u8> {
    let mut h = Vec::new();
    let str = |h: &mut Vec<u8>, s: &str| {
        h.extend_from_slice(&(s.len() as u64).to_le_bytes());
        h.extend_from_slice(s.as_bytes());
    };
    h.extend_from_slice(&identity(program).to_le_bytes());
    str(&mut h, &profile(program));
    h.extend_from_slice(&(checkpoints.len() as u64).to_le_bytes());
    for c in checkpoints {
        str(&mut h, &c.path);
        h.extend_from_slice(&c.size.to_le_bytes());
        h.extend_from_slice(&c.sampled.to_le_bytes());
    }
    h.extend_from_slice(&(records.len() as u64).to_le_bytes());
    for r in records {
        h.extend_from_slice(&[r.packed as u8, r.transposed as u8, r.bf16 as u8, 0]);
        h.extend_from_slice(&r.weight.to_le_bytes());
        h.extend_from_slice(&r.batch.to_le_bytes());
        for x in [r.k, r.n, r.offset, r.len, r.hash] {
            h.extend_from_slice(&x.to_le_bytes());
        }
    }
    h
}

/// A bounds-checked reader of the header.
struct Rd<'a>(&'a [u8], usize);

impl Rd<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let b = self.0.get(self.1..self.1.checked_add(n)?)?;
        self.1 += n;
        Some(b)
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn str(&mut self) -> Option<String> {
        let n = self.u64()?;
        String::from_utf8(self.take(usize::try_from(n).ok()?)?.to_vec()).ok()
    }
}

impl PreparedFile {
    /// Maps the prepared file at `path` and checks it belongs to `program` on this machine:
    /// magic, version, length, header checksum, the program's identity, the profile, the
    /// checkpoint it was made from (when still present, unchanged), every tensor's place and,
    /// with `verify`, every tensor's checksum. Each refusal names the file and the reason.
    pub fn open(path: &Path, program: &Program, verify: bool) -> Result<Self> {
        let bad = |msg: String| RuntimeError::Weights { path: path.to_path_buf(), msg: format!("prepared weight file refused: {msg}") };
        let file = std::fs::File::open(path).map_err(|source| RuntimeError::Io { path: path.to_path_buf(), source })?;
        // SAFETY: opened read-only; kiln writes prepared files only under another name and
        // renames them into place, so a mapped file is never written by kiln.
        let map = unsafe { Mmap::map(&file) }.map_err(|source| RuntimeError::Io { path: path.to_path_buf(), source })?;
        if map.len() < FIXED || &map[..8] != MAGIC {
            let start = String::from_utf8_lossy(&map[..map.len().min(8)]).escape_debug().to_string();
            return Err(bad(format!("not a kiln prepared weight file (it starts with \"{start}\", not \"KILN\\0WTS\")")));
        }
        let u64_at = |i: usize| u64::from_le_bytes(map[i..i + 8].try_into().unwrap_or_default());
        let version = u32::from_le_bytes(map[8..12].try_into().unwrap_or_default());
        if version != VERSION {
            return Err(bad(format!("format version {version}, this kiln reads {VERSION}: run `kiln compile` again")));
        }
        let (hlen, hhash, flen) = (u64_at(16), u64_at(24), u64_at(32));
        if flen != map.len() as u64 {
            let what = if (map.len() as u64) < flen { "truncated" } else { "longer than written" };
            return Err(bad(format!("{what}: {} bytes, its header says {flen}", map.len())));
        }
        let head = usize::try_from(hlen)
            .ok()
            .and_then(|h| map.get(FIXED..FIXED.checked_add(h)?))
            .ok_or_else(|| bad("header overruns the file".into()))?;
        if xxh3_64(head) != hhash {
            return Err(bad("header checksum mismatch: the file is corrupt".into()));
        }
        let corrupt = || bad("malformed header".into());
        let mut rd = Rd(head, 0);
        let id = rd.u64().ok_or_else(corrupt)?;
        let prof = rd.str().ok_or_else(corrupt)?;
        let mut checkpoints = Vec::new();
        for _ in 0..rd.u64().ok_or_else(corrupt)? {
            checkpoints.push(Checkpoint {
                path: rd.str().ok_or_else(corrupt)?,
                size: rd.u64().ok_or_else(corrupt)?,
                sampled: rd.u64().ok_or_else(corrupt)?,
            });
        }
        let mut records = Vec::new();
        for _ in 0..rd.u64().ok_or_else(corrupt)? {
            let f = rd.take(4).ok_or_else(corrupt)?.to_vec();
            let (weight, batch) = (rd.u32().ok_or_else(corrupt)?, rd.u32().ok_or_else(corrupt)?);
            let mut x = [0u64; 5];
            for v in &mut x {
                *v = rd.u64().ok_or_else(corrupt)?;
            }
            let [k, n, offset, len, hash] = x;
            records.push(Record { packed: f[0] == 1, transposed: f[1] == 1, bf16: f[2] == 1, weight, batch, k, n, offset, len, hash });
        }
        let want = identity(program);
        if id != want {
            return Err(bad(format!(
                "stale: written for another artifact (program hash {id:016x}, this artifact's is {want:016x}); run `kiln compile` again or delete it"
            )));
        }
        if prof != profile(program) {
            return Err(bad(format!("written for profile '{prof}', this load needs '{}'", profile(program))));
        }
        for c in &checkpoints {
            let p = Path::new(&c.path);
            if p.exists() {
                let now = fingerprint(p).map_err(|source| RuntimeError::Io { path: p.to_path_buf(), source })?;
                if now != *c {
                    return Err(bad(format!(
                        "stale: the checkpoint {} changed since it was written; run `kiln compile` again or delete it",
                        c.path
                    )));
                }
            }
        }
        for (i, r) in records.iter().enumerate() {
            let spec = program
                .weights
                .get(r.weight as usize)
                .ok_or_else(|| bad(format!("tensor {i} names weight {} of {}", r.weight, program.weights.len())))?;
            let fits =
                r.offset.is_multiple_of(64) && r.offset.checked_add(r.len).is_some_and(|e| e <= flen && r.offset >= (FIXED as u64 + hlen));
            let size_ok = match (r.packed, r.bf16) {
                (true, _) => PackedB::packed_len(r.k as usize, r.n as usize, r.bf16) as u64 == r.len,
                (false, false) => spec.ty.bytes() as u64 == r.len,
                (false, true) => spec.ty.dtype == DType::F32 && spec.ty.numel() as u64 * 2 == r.len,
            };
            if !fits || !size_ok {
                return Err(bad(format!("tensor {i} (weight '{}') lies outside the file or has the wrong size", spec.name)));
            }
        }
        let pf = PreparedFile { path: path.to_path_buf(), map: Arc::new(Mapped(map)), records, checkpoints };
        if verify {
            pf.verify(program)?;
        }
        Ok(pf)
    }

    /// Checks every tensor against its checksum, in parallel.
    pub fn verify(&self, program: &Program) -> Result<()> {
        let total: u64 = self.records.iter().map(|r| r.len).sum();
        let done = AtomicU64::new(0);
        let bytes = self.map.bytes();
        let bad = self.records.par_iter().enumerate().find_any(|(_, r)| {
            let ok = xxh3_64(&bytes[r.offset as usize..(r.offset + r.len) as usize]) == r.hash;
            crate::progress::report("verifying prepared weights", done.fetch_add(r.len, Ordering::Relaxed) + r.len, total);
            !ok
        });
        match bad {
            None => Ok(()),
            Some((i, r)) => Err(RuntimeError::Weights {
                path: self.path.clone(),
                msg: format!(
                    "prepared weight file refused: checksum mismatch in tensor {i} (weight '{}'{}): the file is corrupt; run `kiln compile` again",
                    program.weights.get(r.weight as usize).map(|w| w.name.as_str()).unwrap_or("?"),
                    if r.packed { ", packed" } else { "" }
                ),
            }),
        }
    }

    /// Bytes of tensors the file holds, and how many are packed matrices and raw weights.
    pub fn summary(&self) -> (u64, usize, usize) {
        let packed = self.records.iter().filter(|r| r.packed).count();
        (self.records.iter().map(|r| r.len).sum(), packed, self.records.len() - packed)
    }

    /// Every tensor the file holds, in file order.
    pub fn tensors(&self) -> Vec<TensorInfo> {
        self.records.iter().map(|r| TensorInfo { weight: r.weight, packed: r.packed, bf16: r.bf16, bytes: r.len }).collect()
    }

    /// Whether the weights at `p` are the checkpoint this file was made from.
    pub fn made_from(&self, p: &Path) -> bool {
        let mut want: Vec<String> = self.checkpoints.iter().map(|c| c.path.clone()).collect();
        let mut got: Vec<String> = checkpoint_files(p).iter().map(|f| f.display().to_string()).collect();
        want.sort();
        got.sort();
        want == got
    }

    /// The checkpoint files it was made from.
    pub fn checkpoint_paths(&self) -> Vec<&str> {
        self.checkpoints.iter().map(|c| c.path.as_str()).collect()
    }
}

/// Loads `program` from its opened prepared file: raw weights borrowed from the map, packed
/// matrices read in place; nothing is packed, converted or copied.
pub(crate) fn load(program: &Program, file: Arc<PreparedFile>, store: Arc<WeightStore>) -> Result<exec::CpuExec> {
    let state = super::check(program)?;
    let bad = |msg: String| RuntimeError::Weights { path: file.path.clone(), msg: format!("prepared weight file refused: {msg}") };
    let mut wbufs: Vec<WeightBuf> = (0..program.weights.len()).map(|_| WeightBuf::Owned(Aligned::zeroed(0))).collect();
    let mut by_weight: HashMap<(u32, bool), Vec<(u32, PackedB)>> = HashMap::new();
    let owner: Arc<dyn PanelBytes> = file.map.clone();
    for r in &file.records {
        if !r.packed {
            let (start, file) = (r.offset as usize, 0);
            wbufs[r.weight as usize] = if r.bf16 { WeightBuf::Bf16 { start, file } } else { WeightBuf::Mapped { start, file } };
            continue;
        }
        let m = PackedB::from_bytes(r.k as usize, r.n as usize, r.bf16, owner.clone(), r.offset as usize).map_err(&bad)?;
        by_weight.entry((r.weight, r.transposed)).or_default().push((r.batch, m));
    }
    let mut packs = PackCache::new();
    for (key, mut v) in by_weight {
        v.sort_by_key(|(b, _)| *b);
        if v.iter().enumerate().any(|(i, (b, _))| *b as usize != i) {
            return Err(bad(format!(
                "the packed matrices of weight '{}' are not numbered 0..{}",
                program.weights[key.0 as usize].name,
                v.len()
            )));
        }
        packs.insert(key, Arc::new(v.into_iter().map(|(_, m)| m).collect()));
    }
    // Every packed weight comes from the cache; a miss means the file lacks it.
    let none = |_: u32, _: usize| None;
    let mut prepared =
        program.entries.iter().map(|e| exec::prepare(e, &none, &program.constants, &mut packs)).collect::<Result<Vec<_>>>()?;
    super::pack::link_gathers(program, &mut prepared, &packs);
    let read = super::reads(program, &prepared);
    for (i, spec) in program.weights.iter().enumerate() {
        let missing = read[i] != Read::Packed && spec.ty.bytes() > 0 && matches!(&wbufs[i], WeightBuf::Owned(a) if a.bytes().is_empty());
        if missing {
            return Err(bad(format!("it holds no copy of weight '{}' that the program reads", spec.name)));
        }
        if read[i] == Read::Whole && matches!(wbufs[i], WeightBuf::Bf16 { .. }) {
            return Err(bad(format!("it holds weight '{}' as bf16, but a step other than a gather reads it", spec.name)));
        }
    }
    super::finish(program, store, wbufs, prepared, state)
}

/// How to load an artifact's weights.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Use `<artifact>.weights` when it is there (a cpu program).
    pub prepared: bool,
    /// Check every tensor's checksum of a prepared file.
    pub verify: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { prepared: true, verify: true }
    }
}

/// The weights of the artifact at `artifact` (already read into `program`): its prepared file
/// when there is one for this program, else the checkpoint (`weights`, default the folder it
/// was compiled from). Also says in one line what the load will do. A prepared file that is
/// corrupt, stale or foreign is an error; one made from other weights than `weights` names is
/// not used (the line says so).
pub fn store_for_artifact(artifact: &Path, program: &Program, weights: Option<&Path>, opts: LoadOptions) -> Result<(WeightStore, String)> {
    let pp = path_for(artifact);
    let ordinary = |note: String| -> Result<(WeightStore, String)> {
        let w = weights.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from(&program.source));
        let store = WeightStore::for_program(program, Some(&w))?;
        Ok((store, format!("checkpoint {}: {}{note}", w.display(), plan(program))))
    };
    if program.backend != "cpu" || !opts.prepared || !pp.is_file() {
        return ordinary(String::new());
    }
    let file = PreparedFile::open(&pp, program, false)?;
    if let Some(w) = weights.filter(|w| !file.made_from(w)) {
        let note =
            format!(" (prepared file {} not used: made from {}, not {})", pp.display(), file.checkpoint_paths().join(", "), w.display());
        return ordinary(note);
    }
    let t = std::time::Instant::now();
    if opts.verify {
        file.verify(program)?;
    }
    let checked = match opts.verify {
        true => format!("checksums verified in {:.0} ms", t.elapsed().as_secs_f64() * 1e3),
        false => "checksums not verified".into(),
    };
    let (bytes, packed, raw) = file.summary();
    let line = format!(
        "prepared {}: map {bytes} bytes ({packed} packed matrices, {raw} weights as stored; {checked}); pack none, compile none",
        pp.display()
    );
    Ok((WeightStore::from_prepared(file), line))
}

/// What an ordinary cpu load of `program` does with its weights.
pub fn plan(program: &Program) -> String {
    if program.backend != "cpu" {
        return format!("weights placed by the {} backend at load", program.backend);
    }
    let packed: std::collections::HashSet<(u32, bool)> =
        program.entries.iter().flat_map(|e| e.steps.iter()).filter_map(super::pack::packs).collect();
    format!("pack {} matmul weights at load, compile none", packed.len())
}
