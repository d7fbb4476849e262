//! Weights: safetensors files mapped into memory once, looked up by name.

use crate::error::{Result, RuntimeError};
use kiln_graph::{safetensors, TensorType};
use memmap2::Mmap;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// One tensor's place in a mapped file.
#[derive(Clone, Debug)]
pub struct WeightRef {
    pub file: usize,
    pub ty: TensorType,
    /// Byte range within the file.
    pub start: usize,
    pub end: usize,
}

/// Memory-mapped weight files (safetensors, npz) and their tensor index.
pub struct WeightStore {
    pub paths: Vec<PathBuf>,
    maps: Vec<Mmap>,
    pub index: HashMap<String, WeightRef>,
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
        let mut store = WeightStore { paths: vec![], maps: vec![], index: HashMap::new() };
        for f in files {
            let file = std::fs::File::open(&f).map_err(io(&f))?;
            // SAFETY: the file is opened read-only and kiln never writes to it; a file changed
            // by another process while mapped is outside what any mmap user can guard against.
            let map = unsafe { Mmap::map(&file) }.map_err(io(&f))?;
            let k = store.maps.len();
            let entries = safetensors::index_file(&f, &map).map_err(|msg| RuntimeError::Weights { path: f.clone(), msg })?;
            for e in entries {
                store.index.insert(e.name, WeightRef { file: k, ty: e.ty, start: e.start, end: e.end });
            }
            store.paths.push(f);
            store.maps.push(map);
        }
        Ok(store)
    }

    /// Where a weight lives. A name `base[i]` is slice `i` of `base` along its leading axis
    /// (one layer of a scan-stacked big_vision array): the same mapped bytes at an offset, so
    /// no layer is ever copied.
    pub fn resolve(&self, name: &str) -> Option<WeightRef> {
        if let Some(r) = self.index.get(name) {
            return Some(r.clone());
        }
        let (base, i) = safetensors::stacked_layer(name)?;
        let r = self.index.get(base)?;
        let (ty, start, end) = safetensors::layer_range(&r.ty, r.start, r.end, i)?;
        Some(WeightRef { file: r.file, ty, start, end })
    }

    /// A weight's bytes and type, checked against the shape the program expects.
    pub fn get(&self, name: &str, want: &TensorType) -> Result<(TensorType, &[u8])> {
        let r = self.resolve(name).ok_or_else(|| RuntimeError::Weight {
            name: name.into(),
            msg: format!("not found in {} (expected {want})", self.describe()),
        })?;
        if r.ty.shape != want.shape {
            return Err(RuntimeError::Weight {
                name: name.into(),
                msg: format!("{} holds {}, the program expects shape {:?}", self.paths[r.file].display(), r.ty, want.shape),
            });
        }
        Ok((r.ty, &self.maps[r.file][r.start..r.end]))
    }

    fn describe(&self) -> String {
        self.paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    }
}

impl WeightStore {
    /// The whole mapped file `file`.
    pub fn map_bytes(&self, file: usize) -> &[u8] {
        &self.maps[file]
    }
}

impl WeightStore {
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
        WeightStore { paths: vec![], maps: vec![], index: HashMap::new() }
    }
}
