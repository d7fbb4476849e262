//! A checkpoint folder's tensor index: names, dtypes and shapes from safetensors headers or
//! npz directories. Only the index is read here; the runtime maps the bytes.

use crate::error::{ModelError, Result};
use kiln_graph::{safetensors, TensorType};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where one tensor lives and what it is.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub file: PathBuf,
    pub ty: TensorType,
    /// The name the weight store reads it by: the asked name, or the view an alias stands for.
    pub name: String,
}

/// Every tensor of a folder's `*.safetensors` files.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub tensors: BTreeMap<String, TensorInfo>,
    /// Names a builder asks for that stand for views of stored tensors (`q_proj.weight` of
    /// layer 3 as `llm/layers/attn/q_einsum/w[3]~T(0,2,1)`): one builder over two layouts.
    pub aliases: BTreeMap<String, String>,
    /// A schema checkpoint (see [`Checkpoint::schema`]): what the builder asked for.
    schema: Option<Schema>,
}

/// The state of a schema checkpoint: the name roots it answers for, and every weight a builder
/// asked for, in order, with the shape it expected.
#[derive(Debug)]
struct Schema {
    roots: Vec<String>,
    asked: std::sync::Mutex<Vec<(String, Vec<usize>)>>,
}

impl Clone for Schema {
    fn clone(&self) -> Self {
        Schema { roots: self.roots.clone(), asked: std::sync::Mutex::new(self.asked_now()) }
    }
}

impl Schema {
    fn asked_now(&self) -> Vec<(String, Vec<usize>)> {
        self.asked.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Reads the header of one safetensors file (name -> type), without its data.
pub fn read_header(path: &Path) -> Result<Vec<(String, TensorType)>> {
    use std::io::Read;
    let io = |source| ModelError::Io { path: path.to_path_buf(), source };
    let bad = |msg: String| ModelError::Safetensors { path: path.into(), msg };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let file_len = f.metadata().map_err(io)?.len();
    let mut first = [0u8; 8];
    f.read_exact(&mut first).map_err(|_| bad("shorter than the 8-byte header length".into()))?;
    let n = safetensors::header_len(&first, file_len).map_err(bad)?;
    let mut head = vec![0u8; n];
    f.read_exact(&mut head).map_err(io)?;
    let entries = safetensors::parse_header(&head, file_len).map_err(bad)?;
    Ok(entries.into_iter().map(|e| (e.name, e.ty)).collect())
}

/// Reads the array index of one `.npz` file (big_vision's `np.savez` parameter files).
pub fn read_npz_index(path: &Path) -> Result<Vec<(String, TensorType)>> {
    let io = |source| ModelError::Io { path: path.to_path_buf(), source };
    let f = std::fs::File::open(path).map_err(io)?;
    // SAFETY: the file is opened read-only and only read while mapped; another process
    // rewriting it meanwhile is outside what any mmap user can guard against.
    let map = unsafe { memmap2::Mmap::map(&f) }.map_err(io)?;
    let idx = kiln_graph::npz::read_index(&map, false).map_err(|msg| ModelError::Safetensors { path: path.into(), msg })?;
    Ok(idx.in_file.into_iter().chain(idx.in_buffer).map(|e| (e.name, e.ty)).collect())
}

impl Checkpoint {
    /// Indexes every `*.safetensors` file in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let files = safetensors::weight_files(dir).map_err(|source| ModelError::Io { path: dir.into(), source })?;
        if files.is_empty() {
            return Err(ModelError::Unsupported(format!("{}: no weight file in this folder (model*.safetensors or *.npz)", dir.display())));
        }
        let mut tensors = BTreeMap::new();
        for f in files {
            let entries = if f.extension().is_some_and(|e| e == "npz") { read_npz_index(&f)? } else { read_header(&f)? };
            for (name, ty) in entries {
                tensors.insert(name.clone(), TensorInfo { file: f.clone(), ty, name });
            }
        }
        Ok(Checkpoint { dir: dir.into(), tensors, aliases: BTreeMap::new(), schema: None })
    }

    /// A checkpoint with no weight file that says yes to every weight a builder asks for (any
    /// shape) and records it: how `kiln synth` learns a model's weight list from its builder.
    /// `roots` is the naming layout it answers layout probes for (a name under one of these
    /// prefixes exists; `""` answers for every name); `given` are tensors with fixed types
    /// (values the synthesizer provides, e.g. Jet's permutation matrices).
    pub fn schema(dir: &Path, roots: &[&str], given: &[(String, TensorType)]) -> Self {
        let file = dir.join("(schema)");
        let tensors = given.iter().map(|(n, ty)| (n.clone(), TensorInfo { file: file.clone(), ty: ty.clone(), name: n.clone() })).collect();
        let schema = Schema { roots: roots.iter().map(|r| r.to_string()).collect(), asked: std::sync::Mutex::new(Vec::new()) };
        Checkpoint { dir: dir.into(), tensors, aliases: BTreeMap::new(), schema: Some(schema) }
    }

    /// Whether this is a schema checkpoint (`kiln synth` learning a weight list).
    pub fn is_schema(&self) -> bool {
        self.schema.is_some()
    }

    /// Declares a stored array in a schema checkpoint, for builders that read it through views
    /// (`name[i]~T(..)` aliases): `kiln synth` draws it whole. No effect on a real checkpoint.
    pub fn declare(&mut self, name: &str, shape: &[usize]) {
        if self.schema.is_some() {
            let ty = TensorType::new(kiln_graph::DType::F32, shape.to_vec());
            self.tensors.insert(name.into(), TensorInfo { file: self.dir.join("(schema)"), ty, name: name.into() });
        }
    }

    /// A schema checkpoint's record: each weight the builder asked for that was not given, once,
    /// in the order asked, with its expected shape (`name[i]` for layer i of a stacked array).
    pub fn asked(&self) -> Vec<(String, Vec<usize>)> {
        self.schema.as_ref().map(Schema::asked_now).unwrap_or_default()
    }

    /// A tensor by name, or the view its alias stands for; `base[i]` is slice `i` of `base`
    /// along its leading axis (one layer of a scan-stacked array, which the weight store maps
    /// at an offset without copying), and any [`safetensors::View`] is typed the same way.
    pub fn get(&self, name: &str) -> Option<TensorInfo> {
        let name = self.aliases.get(name).map(String::as_str).unwrap_or(name);
        if let Some(t) = self.tensors.get(name) {
            return Some(t.clone());
        }
        let view = safetensors::parse_view(name);
        let t = self.tensors.get(view.base)?;
        let ty = safetensors::view_type(&t.ty, &view)?;
        Some(TensorInfo { file: t.file.clone(), ty, name: name.to_string() })
    }

    /// Whether the checkpoint holds `name` (slices included). A schema checkpoint holds every
    /// name under its roots.
    pub fn has(&self, name: &str) -> bool {
        match &self.schema {
            Some(s) => self.get(name).is_some() || s.roots.iter().any(|r| name.starts_with(r.as_str())),
            None => self.get(name).is_some(),
        }
    }

    /// The type of a tensor, checked against the expected shape (any float dtype accepted).
    pub fn expect(&self, name: &str, shape: &[usize]) -> Result<TensorInfo> {
        if let Some(s) = self.schema.as_ref().filter(|_| self.get(name).is_none()) {
            let mut asked = s.asked.lock().unwrap_or_else(|e| e.into_inner());
            if !asked.iter().any(|(n, _)| n == name) {
                asked.push((name.to_string(), shape.to_vec()));
            }
            let ty = TensorType::new(kiln_graph::DType::F32, shape.to_vec());
            return Ok(TensorInfo { file: self.dir.join("(schema)"), ty, name: name.to_string() });
        }
        let t = self.get(name).ok_or_else(|| ModelError::MissingTensor {
            dir: self.dir.clone(),
            name: name.into(),
            hint: format!("expected shape {shape:?}"),
        })?;
        let reshaped = safetensors::parse_view(&t.name).any_shape && t.ty.numel() == shape.iter().product::<usize>();
        if (t.ty.shape != shape && !reshaped) || !t.ty.dtype.is_float() {
            return Err(ModelError::TensorType {
                path: t.file.clone(),
                name: name.into(),
                expected: format!("a float tensor of shape {shape:?}"),
                found: t.ty.to_string(),
            });
        }
        Ok(TensorInfo { ty: TensorType::new(t.ty.dtype, shape.to_vec()), ..t })
    }
}
