//! The lowered program: scheduled, planned steps that a backend executes in order.

use crate::dtype::TensorType;
use crate::op::Op;
use serde::{Deserialize, Serialize};

/// Every arena offset is a multiple of this many bytes (and every buffer is padded to it).
pub const ALIGN: usize = 256;

/// Where a step's operand lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Slot {
    /// A byte range of the entry's arena (offsets are 256-byte aligned).
    Arena { offset: usize, bytes: usize },
    /// Weight number `i` of [`Program::weights`] (read-only).
    Weight(u32),
    /// Constant number `i` of [`Program::constants`] (read-only).
    Const(u32),
    /// State number `i` of [`Program::states`]: a persistent buffer the executor owns (a KV
    /// cache). Entry inputs and outputs named like a state live here, and so does a step that
    /// writes a state in place (the lowering proved every reader of the old value runs first).
    State(u32),
}

/// An operand: where it lives and how to read it (a reshape is a view: same slot, new type).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Operand {
    pub slot: Slot,
    pub ty: TensorType,
}

/// One kernel launch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// The graph node this step computes (for reports).
    pub node: u32,
    /// The op, with its attributes; backends dispatch on it.
    pub op: Op,
    /// The kernel the backend chose for it (shown by `kiln inspect`).
    pub kernel: String,
    pub inputs: Vec<Operand>,
    pub output: Operand,
}

/// A named input or output of an entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Io {
    pub name: String,
    pub operand: Operand,
}

/// Memory-plan figures, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanStats {
    /// Arena size: the planned peak.
    pub peak: usize,
    /// The largest sum of sizes live at one step: no plan can do better.
    pub lower_bound: usize,
    /// The sum of all intermediate sizes: a plan with no reuse.
    pub no_reuse: usize,
}

/// One callable program (`forward`, `inverse`, `prefill`, `decode`, ...).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub name: String,
    pub inputs: Vec<Io>,
    pub outputs: Vec<Io>,
    pub steps: Vec<Step>,
    pub arena_bytes: usize,
    pub plan: PlanStats,
}

/// A weight the program reads, by checkpoint name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WeightSpec {
    pub name: String,
    pub ty: TensorType,
}

/// A persistent buffer of a program (a KV cache): the executor owns it ([`Slot::State`]),
/// zeroes it when the program is loaded or reset; an entry input of the same name reads it in
/// place and an entry output of the same name is computed into it (or, where the lowering
/// could not prove that safe, copied into it by a last step), so entries share it across runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StateSpec {
    pub name: String,
    pub ty: TensorType,
}

/// A constant tensor baked into the program.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConstData {
    pub ty: TensorType,
    pub values: Vec<f64>,
}

/// Device code compiled ahead of time (cuda: one CUBIN per kernel module), so that loading
/// needs no compiler.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Binary {
    /// The backend that reads it (`cuda`).
    pub backend: String,
    /// The target it was compiled for (`sm_90a`).
    pub arch: String,
    /// The module's name (`attention`, `fused_0123abcd...`).
    pub name: String,
    pub code: Vec<u8>,
}

/// Everything a runtime needs besides the weights' bytes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Program {
    /// The model family and config it was built from (for messages).
    pub model: String,
    /// The backend the steps were lowered for (`cpu`, ...).
    pub backend: String,
    /// The checkpoint folder it was compiled from: where `kiln run` finds weights by default.
    #[serde(default)]
    pub source: String,
    pub weights: Vec<WeightSpec>,
    pub constants: Vec<ConstData>,
    pub entries: Vec<Entry>,
    /// Persistent state shared by the entries (empty for one-shot models).
    #[serde(default)]
    pub states: Vec<StateSpec>,
    /// Compiled device code (empty for CPU backends; omitted from the file when empty, so
    /// older artifacts and their bytes are unchanged).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub binaries: Vec<Binary>,
    /// Weights read from several checkpoints (an ensemble): each weight name starting with a
    /// set's prefix is that set's tensor of the rest of the name. Empty: every weight comes from
    /// `source`. Omitted from the file when empty; a program with sets is written as format
    /// version 3 (see [`crate::artifact`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub weight_sets: Vec<WeightSet>,
    /// Kernel choices measured on GPUs, by card (`kiln compile --backend cuda` stores the
    /// tuning table's entries: [`crate::tuning`]). Omitted from the file when empty; a program
    /// with entries is written as format version 5.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tuning: Vec<crate::tuning::TuningEntry>,
}

/// One checkpoint of a program whose weights span several ([`Program::weight_sets`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightSet {
    /// The prefix of this checkpoint's weight names in the program (`m0/`).
    pub prefix: String,
    /// The checkpoint (a folder or weight file) as given at compile time; a relative path is
    /// read against the folder a runtime is given (the working directory by default).
    pub path: String,
}

impl Program {
    /// A program with no weights, entries or states yet: what lowering fills.
    pub fn new(model: impl Into<String>, backend: impl Into<String>, source: impl Into<String>) -> Program {
        Program {
            model: model.into(),
            backend: backend.into(),
            source: source.into(),
            weights: vec![],
            constants: vec![],
            entries: vec![],
            states: vec![],
            binaries: vec![],
            weight_sets: vec![],
            tuning: vec![],
        }
    }

    /// The entry with a given name.
    pub fn entry(&self, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// The index of the state called `name` (entry inputs and outputs of that name are it).
    pub fn state_index(&self, name: &str) -> Option<usize> {
        self.states.iter().position(|s| s.name == name)
    }
}
