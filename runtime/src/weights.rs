//! Weights: safetensors and npz files mapped into memory once, looked up by name. A deflated
//! npz (`np.savez_compressed`) is inflated into memory once at open; a permuted view
//! (`name~T(..)`, [`safetensors::View`]) or a stack of weights (`~stack(a|b)`) is materialised
//! once, the first time it is asked for.

use crate::error::{Result, RuntimeError};
use kiln_graph::{npz, safetensors, TensorType};
use memmap2::Mmap;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// One tensor's place in a mapped file.
#[derive(Clone, Debug)]
pub struct WeightRef {
    pub file: usize,
    pub ty: TensorType,
    /// Byte range within the file.
    pub start: usize,
    pub end: usize,
}

/// Bytes a weight can live in: a mapped file, or data inflated from one, or a mapped
/// prepared weight file (shared with the packed matrices read from it).
enum Backing {
    Map(Mmap),
    Owned(Vec<u8>),
    Prepared(Arc<crate::prepared::Mapped>),
}

impl std::ops::Deref for Backing {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Backing::Map(m) => m,
            Backing::Owned(v) => v,
            Backing::Prepared(m) => kiln_kernels::cpu::sgemm512::PanelBytes::bytes(m.as_ref()),
        }
    }
}

/// Memory-mapped weight files (safetensors, npz) and their tensor index.
pub struct WeightStore {
    /// The file each backing came from (a compressed npz appears twice: its map and its
    /// inflated arrays).
    pub paths: Vec<PathBuf>,
    maps: Vec<Backing>,
    pub index: HashMap<String, WeightRef>,
    /// Permuted views materialised so far: their bytes (file `maps.len() + k`) and refs by name.
    views: Mutex<Views>,
    /// The prepared weight file this store is (file 0), when it is one.
    prepared: Option<Arc<crate::prepared::PreparedFile>>,
}

#[derive(Default)]
struct Views {
    bytes: Vec<Box<[u8]>>,
    by_name: HashMap<String, WeightRef>,
}

impl WeightStore {
    /// Maps the weights at `path`: a `.safetensors` or `.npz` file, or a folder whose weight files
    /// (`model*.safetensors`, `*.npz`) are all mapped.
    pub fn open(path: &Path) -> Result<Self> {
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| RuntimeError::Io { path: p, source }
        };
        let files: Vec<PathBuf> = if path.is_dir() { safetensors::weight_files(path).map_err(io(path))? } else { vec![path.to_path_buf()] };
        if files.is_empty() {
            return Err(RuntimeError::Weights { path: path.into(), msg: "no weight file here (model*.safetensors or *.npz)".into() });
        }
        let mut store = WeightStore::empty();
        for f in files {
            let file = std::fs::File::open(&f).map_err(io(&f))?;
            // SAFETY: the file is opened read-only and kiln never writes to it; a file changed
            // by another process while mapped is outside what any mmap user can guard against.
            let map = unsafe { Mmap::map(&file) }.map_err(io(&f))?;
            let bad = |msg| RuntimeError::Weights { path: f.clone(), msg };
            let (entries, inflated) = if f.extension().is_some_and(|e| e == "npz") {
                let idx = npz::read_index(&map, true).map_err(bad)?;
                (idx.in_file, (!idx.in_buffer.is_empty()).then_some((idx.in_buffer, idx.inflated)))
            } else {
                (safetensors::index_file(&f, &map).map_err(bad)?, None)
            };
            store.add(&f, Backing::Map(map), entries);
            if let Some((entries, bytes)) = inflated {
                store.add(&f, Backing::Owned(bytes), entries);
            }
        }
        Ok(store)
    }

    fn add(&mut self, path: &Path, backing: Backing, entries: Vec<safetensors::HeaderEntry>) {
        let k = self.maps.len();
        for e in entries {
            self.index.insert(e.name, WeightRef { file: k, ty: e.ty, start: e.start, end: e.end });
        }
        self.paths.push(path.to_path_buf());
        self.maps.push(backing);
    }

    /// Where a weight lives. A name `base[i]` is slice `i` of `base` along its leading axis
    /// (one layer of a scan-stacked big_vision array): the same mapped bytes at an offset, so
    /// no layer is ever copied. A view with a permutation (`base[i]~T(..)`) or rounded to
    /// bfloat16 (`base~bf16`) is copied once, transformed, and kept for the store's life.
    /// A stacked weight (`p/~stack(a|b)`, [`safetensors::stack_parts`]) is its parts' bytes
    /// concatenated once and kept likewise.
    pub fn resolve(&self, name: &str) -> Option<WeightRef> {
        if let Some(r) = self.index.get(name) {
            return Some(r.clone());
        }
        if let Some(parts) = safetensors::stack_parts(name) {
            return self.resolve_stack(name, &parts);
        }
        let view = safetensors::parse_view(name);
        let r = self.index.get(view.base)?;
        let (ty, start, end) = safetensors::view_range(&r.ty, r.start, r.end, &view)?;
        let rounds = view.bf16 && ty.dtype == kiln_graph::DType::F32;
        if view.perm.is_none() && !rounds {
            return Some(WeightRef { file: r.file, ty, start, end });
        }
        let out_ty = safetensors::view_type(&r.ty, &view)?;
        let mut views = self.views.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = views.by_name.get(name) {
            return Some(v.clone());
        }
        let src = &self.maps[r.file][start..end];
        let mut bytes = safetensors::view_bytes(src, ty.dtype.size(), &ty.shape, &view);
        if rounds {
            safetensors::round_bf16(&mut bytes);
        }
        let v = WeightRef { file: self.maps.len() + views.bytes.len(), ty: out_ty, start: 0, end: bytes.len() };
        views.bytes.push(bytes.into_boxed_slice());
        views.by_name.insert(name.to_string(), v.clone());
        Some(v)
    }

    /// The stack of the weights `parts` (one size each), materialised once: in the parts' dtype,
    /// or in f32 when they are floats of different dtypes (every f16 and bf16 is an f32, so each
    /// part converts to the program's dtype as it would unstacked).
    fn resolve_stack(&self, name: &str, parts: &[String]) -> Option<WeightRef> {
        if let Some(v) = self.views.lock().unwrap_or_else(|e| e.into_inner()).by_name.get(name) {
            return Some(v.clone());
        }
        let refs = parts.iter().map(|p| self.resolve(p)).collect::<Option<Vec<_>>>()?;
        // The smallest part is one slice; every other fills a whole number of slices
        // ([`safetensors::stack_slots`]; `get` checks them against the program's shape).
        let first = refs.iter().min_by_key(|r| r.ty.numel())?.ty.clone();
        if first.numel() == 0 || refs.iter().any(|r| r.ty.numel() % first.numel() != 0) {
            return None;
        }
        let slices: usize = refs.iter().map(|r| r.ty.numel() / first.numel()).sum();
        let dtype = if refs.iter().all(|r| r.ty.dtype == first.dtype) { first.dtype } else { kiln_graph::DType::F32 };
        let mut bytes = Vec::with_capacity(first.numel() * dtype.size() * slices);
        for r in &refs {
            let b = &self.map_bytes(r.file)[r.start..r.end];
            if r.ty.dtype == dtype {
                bytes.extend_from_slice(b);
            } else {
                bytes.extend(crate::tensor::floats_to_f32(r.ty.dtype, b)?.iter().flat_map(|v| v.to_le_bytes()));
            }
        }
        let mut shape = vec![slices];
        shape.extend_from_slice(&first.shape);
        let mut views = self.views.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = views.by_name.get(name) {
            return Some(v.clone());
        }
        let v = WeightRef { file: self.maps.len() + views.bytes.len(), ty: TensorType::new(dtype, shape), start: 0, end: bytes.len() };
        views.bytes.push(bytes.into_boxed_slice());
        views.by_name.insert(name.to_string(), v.clone());
        Some(v)
    }

    /// Checks every part of a stacked weight against one slice of `want` (so a missing part, a
    /// part of another shape, or parts of different dtypes that are not all floats, is an error
    /// naming the part).
    fn check_stack(&self, name: &str, parts: &[String], want: &TensorType) -> Result<()> {
        let bad = |msg: String| RuntimeError::Weight { name: name.into(), msg };
        let slice = want.shape.get(1..).unwrap_or(&[]).to_vec();
        let mut first: Option<(&String, kiln_graph::DType)> = None;
        let mut slots = 0;
        for p in parts {
            // A part fills one slice, or several joined along the slice's first axis.
            let stored = self.resolve(p).map(|r| r.ty.shape);
            let m = stored.as_deref().and_then(|s| safetensors::stack_slots(s, &slice)).unwrap_or(1);
            let mut shape = slice.clone();
            if let Some(s0) = shape.first_mut() {
                *s0 *= m;
            }
            let (ty, _) = self.get(p, &TensorType::new(want.dtype, shape))?;
            slots += m;
            match first {
                Some((f, d)) if d != ty.dtype && !(d.is_float() && ty.dtype.is_float()) => {
                    return Err(bad(format!(
                        "part {p} is stored as {}, part {f} as {d}: a stack of mixed dtypes must be all floats",
                        ty.dtype
                    )));
                }
                Some(_) => {}
                None => first = Some((p, ty.dtype)),
            }
        }
        if want.shape.first() != Some(&slots) {
            return Err(bad(format!(
                "stacks {} weights ({slots} slices of {slice:?}), the program expects shape {:?}",
                parts.len(),
                want.shape
            )));
        }
        Ok(())
    }

    /// A weight's bytes and type, checked against the shape the program expects (a view marked
    /// `~T(..)` or `~reshape` may be read in any shape of as many elements; each part of a
    /// stacked weight is checked against one slice of it).
    pub fn get(&self, name: &str, want: &TensorType) -> Result<(TensorType, &[u8])> {
        let stack = safetensors::stack_parts(name);
        if let Some(parts) = &stack {
            self.check_stack(name, parts, want)?;
        }
        let r = self.resolve(name).ok_or_else(|| RuntimeError::Weight {
            name: name.into(),
            msg: format!("not found in {} (expected {want})", self.describe()),
        })?;
        // A stack's parts were each checked against a slice of `want`.
        let reshaped = (stack.is_some() || safetensors::parse_view(name).any_shape) && r.ty.numel() == want.numel();
        if r.ty.shape != want.shape && !reshaped {
            return Err(RuntimeError::Weight {
                name: name.into(),
                msg: format!("{} holds {}, the program expects shape {:?}", self.file_name(r.file), r.ty, want.shape),
            });
        }
        let ty = TensorType::new(r.ty.dtype, want.shape.clone());
        Ok((ty, &self.map_bytes(r.file)[r.start..r.end]))
    }

    fn file_name(&self, file: usize) -> String {
        self.paths.get(file).map(|p| p.display().to_string()).unwrap_or_else(|| "a permuted view".into())
    }

    fn describe(&self) -> String {
        self.paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    }

    /// The whole mapped file (or inflated data, or materialised view) `file`.
    pub fn map_bytes(&self, file: usize) -> &[u8] {
        if let Some(m) = self.maps.get(file) {
            return m;
        }
        let views = self.views.lock().unwrap_or_else(|e| e.into_inner());
        let b: &[u8] = &views.bytes[file - self.maps.len()];
        // SAFETY: a view's box is only ever pushed, never removed, replaced or written, and is
        // dropped only with the store, so its heap block outlives this borrow of `self`; the
        // Vec holding the boxes may reallocate, which moves the boxes but not their contents.
        unsafe { std::slice::from_raw_parts(b.as_ptr(), b.len()) }
    }

    /// The weights of `program`. A program of one checkpoint reads `path`, else the folder it
    /// was compiled from. A program whose weights span several checkpoints (its
    /// [`weight_sets`](kiln_graph::program::Program::weight_sets), an ensemble) reads `path`
    /// when it is a file holding every set's weights under their prefixes; otherwise it maps
    /// each set's checkpoint, a relative one read against the folder `path` (default: the
    /// working directory), and indexes its tensors under the set's prefix.
    pub fn for_program(program: &kiln_graph::program::Program, path: Option<&Path>) -> Result<Self> {
        if program.weight_sets.is_empty() || path.is_some_and(|p| p.is_file()) {
            return WeightStore::open(path.unwrap_or(Path::new(&program.source)));
        }
        let mut store = WeightStore::empty();
        for set in &program.weight_sets {
            let p = Path::new(&set.path);
            let at = match path {
                Some(root) if p.is_relative() => root.join(p),
                _ => p.to_path_buf(),
            };
            if !at.exists() {
                let msg = format!(
                    "no weights for the program's set '{}' here (compiled from {}; a relative path is read against the given folder)",
                    set.prefix, set.path
                );
                return Err(RuntimeError::Weights { path: at, msg });
            }
            let one = WeightStore::open(&at)?;
            let base = store.maps.len();
            for (name, r) in one.index {
                store.index.insert(format!("{}{name}", set.prefix), WeightRef { file: base + r.file, ..r });
            }
            store.paths.extend(one.paths);
            store.maps.extend(one.maps);
        }
        Ok(store)
    }

    /// A store with no files, for programs that read no weights.
    pub fn empty() -> Self {
        WeightStore { paths: vec![], maps: vec![], index: HashMap::new(), views: Mutex::new(Views::default()), prepared: None }
    }

    /// A store holding one prepared weight file (opened and checked by
    /// [`PreparedFile::open`](crate::prepared::PreparedFile::open)): the cpu backend and the
    /// cuda upload read every weight from it in place, and look nothing up by name.
    pub fn from_prepared(file: crate::prepared::PreparedFile) -> Self {
        let mut store = WeightStore::empty();
        store.paths.push(file.path.clone());
        store.maps.push(Backing::Prepared(file.map.clone()));
        store.prepared = Some(Arc::new(file));
        store
    }

    /// The prepared weight file this store holds, if it is one.
    pub fn prepared(&self) -> Option<&Arc<crate::prepared::PreparedFile>> {
        self.prepared.as_ref()
    }
}
