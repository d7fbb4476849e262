//! The prepared weight file (`<artifact>.weights`): every weight of a program in the layout
//! its backend reads, written once by `kiln compile` and mapped at load, so a load converts
//! nothing, packs nothing and copies nothing on the host. One format, one profile per backend:
//! the cpu profile ([`crate::cpu::prepared`]) holds packed GEMM panels beside raw weights; the
//! cuda profile ([`cuda`]) holds each weight exactly as the upload sends it.
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
//! refuses the file), the profile string ([`profile`]: the backend and its layout, so a file
//! of one backend is refused by another's load by name), the checkpoint files it was made from
//! (path, size and a sampled hash, so a checkpoint rewritten since is noticed), then one record
//! per tensor: a weight as the program reads it (its dtype, raw; or the checkpoint's bf16 bits
//! of an f32 weight that only gathers read, which widen the rows they copy: an embedding table
//! stays half the size) or one packed matrix of a weight (`[n/32][k][32]` panels, f32 or the
//! checkpoint's bf16 bits), each with its offset, length and XXH3-64. Version 2 added the bf16
//! raw weight.
//!
//! Verification rule: the header is always checked; every tensor's checksum is checked at
//! load, in parallel over the tensors (XXH3 runs at memory speed, and a forward pass reads
//! every weight anyway, so this costs one extra read of the file: see BENCHMARKS.md).

pub mod cuda;

use crate::error::{Result, RuntimeError};
use crate::weights::WeightStore;
use kiln_graph::program::Program;
use kiln_graph::DType;
use kiln_kernels::cpu::sgemm512::{PackedB, PanelBytes};
use memmap2::Mmap;
use rayon::prelude::*;
use std::borrow::Cow;
use std::io::{Seek, Write};
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
/// Tensors whose bytes are made (converted, hashed) together while writing: bounds the host
/// memory a write holds beyond the store.
const BATCH: u64 = 256 << 20;

/// Where the prepared weight file of an artifact lies: beside it, `<artifact>.weights`.
pub fn path_for(artifact: &Path) -> PathBuf {
    let mut p = artifact.as_os_str().to_owned();
    p.push(".weights");
    PathBuf::from(p)
}

/// Whether `backend` has a prepared-file profile (cpu and cuda).
pub fn supported(backend: &str) -> bool {
    matches!(backend, "cpu" | "cuda")
}

/// What the file's layout depends on besides the program: the backend and its layout (cpu:
/// the packed-panel layout and whether this CPU packs; cuda: [`cuda::PROFILE`]).
pub fn profile(program: &Program) -> String {
    match program.backend.as_str() {
        "cuda" => cuda::PROFILE.to_string(),
        _ => crate::cpu::prepared::profile(program),
    }
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
pub(crate) struct Record {
    /// Packed panels (else the weight's bytes as the program reads them).
    pub(crate) packed: bool,
    pub(crate) weight: u32,
    /// Packed: the product transposes the weight; which matrix of a batched weight. Packed or
    /// raw: bf16 bits (a raw one is an f32 weight read only by gathers).
    pub(crate) transposed: bool,
    pub(crate) bf16: bool,
    pub(crate) batch: u32,
    pub(crate) k: u64,
    pub(crate) n: u64,
    pub(crate) offset: u64,
    pub(crate) len: u64,
    pub(crate) hash: u64,
}

impl Record {
    /// A raw weight of `len` bytes (placed and hashed by [`write_file`]).
    pub(crate) fn raw(weight: u32, bf16: bool, len: u64) -> Record {
        Record { packed: false, weight, transposed: false, bf16, batch: 0, k: 0, n: 0, offset: 0, len, hash: 0 }
    }
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
    pub(crate) records: Vec<Record>,
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

/// The bytes of each tensor a writer stores, by its index in the records.
pub(crate) type TensorBytes<'a> = dyn Fn(usize) -> Result<Cow<'a, [u8]>> + Sync + 'a;

/// Writes the prepared file of `program` made from `weights` to `out`, atomically (a `.tmp`
/// file renamed over it), with progress: `records` in file order (their lengths set), each
/// tensor's bytes asked of `bytes` (a batch of tensors at a time, made and hashed in parallel,
/// then written), and the header, holding the checksums, written last at the front.
pub(crate) fn write_file(
    program: &Program,
    weights: &WeightStore,
    out: &Path,
    mut records: Vec<Record>,
    bytes: &TensorBytes,
) -> Result<Written> {
    let mut seen_paths = std::collections::HashSet::new();
    let mut checkpoints = Vec::new();
    for p in &weights.paths {
        if seen_paths.insert(p.clone()) {
            checkpoints.push(fingerprint(p).map_err(|source| RuntimeError::Io { path: p.clone(), source })?);
        }
    }
    // The header's length does not depend on the offsets or checksums, so lay out with zeros.
    let h = header(program, &checkpoints, &records).len();
    let mut at = (FIXED + h) as u64;
    for r in &mut records {
        at = at.next_multiple_of(ALIGN);
        r.offset = at;
        at += r.len;
    }
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| RuntimeError::Io { path: p, source }
    };
    let mut tmp = out.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    let mut w = std::io::BufWriter::with_capacity(8 << 20, file);
    let result = (|| -> Result<()> {
        let werr = |e| RuntimeError::Io { path: tmp.clone(), source: e };
        w.write_all(&vec![0; FIXED + h]).map_err(werr)?;
        let mut pos = (FIXED + h) as u64;
        let mut i = 0;
        while i < records.len() {
            // A batch: tensors up to BATCH bytes (at least one).
            let mut end = i + 1;
            let mut size = records[i].len;
            while end < records.len() && size + records[end].len <= BATCH {
                size += records[end].len;
                end += 1;
            }
            let made: Vec<(Cow<[u8]>, u64)> = (i..end)
                .into_par_iter()
                .map(|j| {
                    let b = bytes(j)?;
                    let hash = xxh3_64(&b);
                    Ok((b, hash))
                })
                .collect::<Result<_>>()?;
            for (j, (b, hash)) in (i..end).zip(made) {
                let r = &mut records[j];
                if b.len() as u64 != r.len {
                    let name = program.weights.get(r.weight as usize).map_or("?", |s| s.name.as_str());
                    return Err(RuntimeError::Weight { name: name.into(), msg: format!("made {} bytes, expected {}", b.len(), r.len) });
                }
                r.hash = hash;
                w.write_all(&vec![0; (r.offset - pos) as usize]).map_err(werr)?;
                w.write_all(&b).map_err(werr)?;
                pos = r.offset + r.len;
                crate::progress::report("writing prepared weights", pos, at);
            }
            i = end;
        }
        let head = header(program, &checkpoints, &records);
        let mut fixed = Vec::with_capacity(FIXED);
        fixed.extend_from_slice(MAGIC);
        fixed.extend_from_slice(&VERSION.to_le_bytes());
        fixed.extend_from_slice(&0u32.to_le_bytes());
        fixed.extend_from_slice(&(head.len() as u64).to_le_bytes());
        fixed.extend_from_slice(&xxh3_64(&head).to_le_bytes());
        fixed.extend_from_slice(&at.to_le_bytes());
        w.seek(std::io::SeekFrom::Start(0)).map_err(werr)?;
        w.write_all(&fixed).map_err(werr)?;
        w.write_all(&head).map_err(werr)?;
        w.flush().map_err(werr)
    })();
    drop(w);
    if let Err(e) = result.and_then(|_| std::fs::rename(&tmp, out).map_err(io(out))) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
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
    /// magic, version, length, header checksum, the profile (the backend's layout), the
    /// program's identity, the checkpoint it was made from (when still present, unchanged),
    /// every tensor's place and, with `verify`, every tensor's checksum. Each refusal names
    /// the file and the reason.
    pub fn open(path: &Path, program: &Program, verify: bool) -> Result<Self> {
        let bad = |msg: String| refused(path, msg);
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
        // The profile first: a file of another backend (or CPU) is named as such, not as stale.
        if prof != profile(program) {
            return Err(bad(format!("written for profile '{prof}', this load needs '{}'", profile(program))));
        }
        let want = identity(program);
        if id != want {
            return Err(bad(format!(
                "stale: written for another artifact (program hash {id:016x}, this artifact's is {want:016x}); run `kiln compile` again or delete it"
            )));
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
        if program.backend == "cuda" {
            cuda::check_records(program, &records).map_err(bad)?;
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
            Some((i, r)) => Err(refused(
                &self.path,
                format!(
                    "checksum mismatch in tensor {i} (weight '{}'{}): the file is corrupt; run `kiln compile` again",
                    program.weights.get(r.weight as usize).map(|w| w.name.as_str()).unwrap_or("?"),
                    if r.packed { ", packed" } else { "" }
                ),
            )),
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

    /// The stored bytes of weight `weight` as the program reads it (a raw tensor, not bf16
    /// bits of an f32 weight), when the file holds them.
    pub fn raw(&self, weight: u32) -> Option<&[u8]> {
        let r = self.records.iter().find(|r| !r.packed && !r.bf16 && r.weight == weight)?;
        self.map.bytes().get(r.offset as usize..(r.offset + r.len) as usize)
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

/// A refusal of the prepared file at `path`.
pub(crate) fn refused(path: &Path, msg: String) -> RuntimeError {
    RuntimeError::Weights { path: path.to_path_buf(), msg: format!("prepared weight file refused: {msg}") }
}

/// How to load an artifact's weights.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Use `<artifact>.weights` when it is there (a cpu or cuda program).
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
        let plan = match program.backend.as_str() {
            "cuda" => cuda::plan(program, Some(&store)),
            _ => crate::cpu::prepared::plan(program),
        };
        Ok((store, format!("checkpoint {}: {plan}{note}", w.display())))
    };
    if !supported(&program.backend) || !opts.prepared || !pp.is_file() {
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
    let line = prepared_line(&file, program, &checked);
    Ok((WeightStore::from_prepared(file), line))
}

/// What a load from the prepared file `file` does (`checked`: what became of its checksums).
pub fn prepared_line(file: &PreparedFile, program: &Program, checked: &str) -> String {
    let (bytes, packed, raw) = file.summary();
    let at = file.path.display();
    match program.backend.as_str() {
        "cuda" => format!(
            "prepared {at}: map {bytes} bytes ({raw} weights as the upload sends them; {checked}); upload {bytes} bytes, convert none"
        ),
        _ => format!(
            "prepared {at}: map {bytes} bytes ({packed} packed matrices, {raw} weights as stored; {checked}); pack none, compile none"
        ),
    }
}
