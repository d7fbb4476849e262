//! The cpu profile of the prepared weight file ([`crate::prepared`], whose header comment
//! documents the byte layout): each weight some step reads as it is, and each packed matrix of
//! a matmul weight as its AVX-512 panels, so a cpu load packs nothing, converts nothing and
//! copies nothing. The format and its checks are shared with the cuda profile and re-exported
//! here.

use super::exec::{self, PackCache};
use super::{Aligned, Read, WeightBuf};
use crate::error::{Result, RuntimeError};
use crate::prepared::Record;
pub use crate::prepared::{path_for, store_for_artifact, LoadOptions, Mapped, PreparedFile, TensorInfo, Written, MAGIC, VERSION};
use crate::weights::WeightStore;
use kiln_graph::program::{Program, Slot};
use kiln_kernels::cpu::sgemm512::{self, PackedB, PanelBytes};
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// What the file's layout depends on besides the program: the backend, the packed-panel
/// layout, and whether this CPU packs at all (only with AVX-512F).
pub fn profile(program: &Program) -> String {
    let packs = if sgemm512::available() { "packed for AVX-512F" } else { "no packing (no AVX-512F)" };
    format!("backend {}; {}; {packs}", program.backend, sgemm512::LAYOUT)
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
        tensors.push((Record::raw(i as u32, bf16, bytes.len() as u64), bytes));
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
    let records = tensors.iter().map(|(r, _)| r.clone()).collect();
    crate::prepared::write_file(program, &weights, out, records, &|j| Ok(Cow::Borrowed(tensors[j].1)))
}

/// Loads `program` from its opened prepared file: raw weights borrowed from the map, packed
/// matrices read in place; nothing is packed, converted or copied.
pub(crate) fn load(program: &Program, file: Arc<PreparedFile>, store: Arc<WeightStore>) -> Result<exec::CpuExec> {
    let state = super::check(program)?;
    let bad = |msg: String| crate::prepared::refused(&file.path, msg);
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

/// What an ordinary cpu load of `program` does with its weights.
pub fn plan(program: &Program) -> String {
    if program.backend != "cpu" {
        return format!("weights placed by the {} backend at load", program.backend);
    }
    let packed: std::collections::HashSet<(u32, bool)> =
        program.entries.iter().flat_map(|e| e.steps.iter()).filter_map(super::pack::packs).collect();
    format!("pack {} matmul weights at load, compile none", packed.len())
}
