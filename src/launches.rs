//! Steps and kernel launches per entry of a program, counted from its backend's lowering with
//! no device (`kiln inspect`, `kiln inspect --json`): a step that is two launches on the device
//! (a GEMM and its epilogue kernel, a concat's copies) counts two, a view none.

use crate::Result;
use kiln_graph::program::Program;

/// What one entry costs in launches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryLaunches {
    pub name: String,
    pub steps: usize,
    pub launches: usize,
    /// Steps that run through the reference interpreter (each one launch, slow).
    pub interpreted: usize,
    pub arena_bytes: usize,
}

/// Every entry of `program`, in order, counted on the program's backend.
pub fn count(program: &Program) -> Result<Vec<EntryLaunches>> {
    let backend = kiln_runtime::by_name(&program.backend)?;
    let mut out = Vec::with_capacity(program.entries.len());
    for (i, e) in program.entries.iter().enumerate() {
        let per_step = backend
            .launches(program, i)
            .map_err(|m| crate::Error::Usage(format!("entry {}: counting launches on backend {}: {m}", e.name, program.backend)))?;
        out.push(EntryLaunches {
            name: e.name.clone(),
            steps: e.steps.len(),
            launches: per_step.iter().sum(),
            interpreted: e.steps.iter().filter(|s| backend.interpreted(&s.kernel)).count(),
            arena_bytes: e.arena_bytes,
        });
    }
    Ok(out)
}

/// `{"backend": .., "entries": {"decode": {"steps": N, "launches": M, ..}, ..}}`.
pub fn json(program: &Program) -> Result<serde_json::Value> {
    let mut entries = serde_json::Map::new();
    for e in count(program)? {
        let v = serde_json::json!({
            "steps": e.steps,
            "launches": e.launches,
            "interpreted": e.interpreted,
            "arena_bytes": e.arena_bytes,
        });
        entries.insert(e.name, v);
    }
    Ok(serde_json::json!({ "model": program.model, "backend": program.backend, "entries": entries }))
}
