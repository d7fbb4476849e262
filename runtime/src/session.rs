//! A session: one program and its weights loaded once, run many times.

use crate::backend::{by_name, Backend, Executable};
use crate::error::{Result, RuntimeError};
use crate::tensor::Tensor;
use crate::weights::WeightStore;
use kiln_graph::program::Program;
use kiln_graph::TensorType;
use std::path::Path;
use std::sync::Arc;

/// An input [`Session::run_views`] borrows: a type and the bytes that hold it.
pub trait InputView {
    /// The tensor's type.
    fn ty(&self) -> &TensorType;
    /// Its bytes, row-major, `ty().bytes()` long.
    fn bytes(&self) -> &[u8];
}

impl InputView for &Tensor {
    fn ty(&self) -> &TensorType {
        &self.ty
    }
    fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl InputView for (&TensorType, &[u8]) {
    fn ty(&self) -> &TensorType {
        self.0
    }
    fn bytes(&self) -> &[u8] {
        self.1
    }
}

/// A loaded program, ready to run. Its persistent state ([`Program::states`]) lives in the
/// executable, where entries read and update it in place.
pub struct Session {
    program: Program,
    exec: Box<dyn Executable>,
}

impl Session {
    /// Loads `program` on its backend with `weights`.
    pub fn new(program: Program, weights: Arc<WeightStore>) -> Result<Self> {
        program.validate().map_err(crate::error::RuntimeError::Invalid)?;
        let backend = by_name(&program.backend)?;
        let exec = backend.load(&program, weights)?;
        Ok(Session { program, exec })
    }

    /// Loads `program` on `backend`: one configured beyond its name (the cuda backend with
    /// its GEMV forced on or off, say), which must be the program's backend.
    pub fn with_backend(program: Program, weights: Arc<WeightStore>, backend: &dyn Backend) -> Result<Self> {
        if backend.name() != program.backend {
            return Err(crate::error::RuntimeError::Unsupported {
                backend: backend.name().into(),
                msg: format!("the program was compiled for backend {}", program.backend),
            });
        }
        program.validate().map_err(crate::error::RuntimeError::Invalid)?;
        let exec = backend.load(&program, weights)?;
        Ok(Session { program, exec })
    }

    /// Loads an artifact file and its weights: a safetensors file or a folder (for an ensemble,
    /// see [`WeightStore::for_program`]). The artifact's prepared weight file
    /// (`<artifact>.weights`, [`crate::cpu::prepared`]) is used instead when it was made from
    /// these weights.
    pub fn load(artifact: &Path, weights: &Path) -> Result<Self> {
        Ok(Session::load_with(artifact, Some(weights), crate::cpu::prepared::LoadOptions::default())?.0)
    }

    /// [`Session::load`] with the weights optional (default: the prepared file beside the
    /// artifact, else the folder it was compiled from) and load options; also gives one line
    /// saying what the load did (mapped a prepared file, or packed weights from a checkpoint).
    pub fn load_with(artifact: &Path, weights: Option<&Path>, opts: crate::cpu::prepared::LoadOptions) -> Result<(Self, String)> {
        let program = kiln_graph::artifact::load_file(artifact)?;
        let (store, report) = crate::cpu::prepared::store_for_artifact(artifact, &program, weights, opts)?;
        Ok((Session::new(program, Arc::new(store))?, report))
    }

    /// The program this session runs.
    pub fn program(&self) -> &Program {
        &self.program
    }

    /// The index of an entry by name.
    pub fn entry_index(&self, name: &str) -> Result<usize> {
        self.program.entries.iter().position(|e| e.name == name).ok_or_else(|| RuntimeError::Entry {
            name: name.into(),
            have: self.program.entries.iter().map(|e| e.name.as_str()).collect::<Vec<_>>().join(", "),
        })
    }

    /// Zeroes the persistent state (an empty KV cache, as after load).
    pub fn reset_states(&mut self) -> Result<()> {
        self.exec.reset_states()
    }

    /// Reorders the batch rows of every persistent state in place, on the backend's device:
    /// afterwards row `r` of each state holds what its row `rows[r]` held. Rows may repeat
    /// (a prompt's KV cache copied to several samples, a beam kept twice) or be left out.
    /// Every state's leading axis must be the batch, of `rows.len()` rows.
    pub fn gather_state_rows(&mut self, rows: &[usize]) -> Result<()> {
        let b = rows.len();
        for st in &self.program.states {
            if st.ty.shape.first() != Some(&b) {
                return Err(RuntimeError::Input {
                    name: st.name.clone(),
                    msg: format!("gather_state_rows: {} rows given, this state is {} (its leading axis must be the batch)", b, st.ty),
                });
            }
        }
        if let Some(&r) = rows.iter().find(|&&r| r >= b) {
            return Err(RuntimeError::Input { name: "rows".into(), msg: format!("row {r} is out of range for a batch of {b}") });
        }
        self.exec.gather_state_rows(rows)
    }

    /// A copy of the persistent state named `name`, if the program has one.
    pub fn state(&mut self, name: &str) -> Result<Option<Tensor>> {
        let Some(i) = self.program.state_index(name) else { return Ok(None) };
        let mut t = Tensor::zeros(self.program.states[i].ty.clone());
        self.exec.read_state(i, &mut t.bytes)?;
        Ok(Some(t))
    }

    /// Runs an entry on named inputs and returns its named outputs (allocated here). Entry
    /// inputs named like a state read it in place unless given (a given one sets the state
    /// first); entry outputs named like a state are stored into it and not returned.
    pub fn run(&mut self, entry: &str, inputs: &[(&str, &Tensor)]) -> Result<Vec<(String, Tensor)>> {
        self.run_views(entry, inputs)
    }

    /// [`Session::run`] on borrowed inputs: each a type and its bytes, owned by the caller (a
    /// NumPy array's memory, say), with the same checks and messages.
    pub fn run_views<V: InputView>(&mut self, entry: &str, inputs: &[(&str, V)]) -> Result<Vec<(String, Tensor)>> {
        let ei = self.entry_index(entry)?;
        let e = &self.program.entries[ei];
        let is_state = |name: &str| self.program.state_index(name).is_some();
        for (name, _) in inputs {
            if !e.inputs.iter().any(|io| io.name == *name) {
                let want: Vec<String> = e.inputs.iter().map(|io| format!("{} {}", io.name, io.operand.ty)).collect();
                return Err(RuntimeError::Input {
                    name: name.to_string(),
                    msg: format!("not an input of '{entry}' (it takes: {})", want.join(", ")),
                });
            }
        }
        let mut ordered: Vec<&[u8]> = Vec::with_capacity(e.inputs.len());
        for io in &e.inputs {
            let Some(t) = inputs.iter().find(|(n, _)| *n == io.name).map(|(_, t)| t) else {
                if is_state(&io.name) {
                    ordered.push(&[]);
                    continue;
                }
                return Err(RuntimeError::Input { name: io.name.clone(), msg: format!("missing; '{entry}' needs {}", io.operand.ty) });
            };
            if *t.ty() != io.operand.ty {
                return Err(RuntimeError::Input { name: io.name.clone(), msg: format!("expected {}, found {}", io.operand.ty, t.ty()) });
            }
            if t.bytes().len() != t.ty().bytes() {
                let msg = format!("{} bytes given, {} needs {}", t.bytes().len(), t.ty(), t.ty().bytes());
                return Err(RuntimeError::Input { name: io.name.clone(), msg });
            }
            ordered.push(t.bytes());
        }
        let mut outs: Vec<(String, Tensor)> =
            e.outputs.iter().filter(|io| !is_state(&io.name)).map(|io| (io.name.clone(), Tensor::zeros(io.operand.ty.clone()))).collect();
        {
            let mut fresh = outs.iter_mut();
            let mut bufs: Vec<&mut [u8]> = e
                .outputs
                .iter()
                .map(|io| match is_state(&io.name) {
                    true => Some(<&mut [u8]>::default()),
                    false => fresh.next().map(|(_, t)| t.bytes.as_mut_slice()),
                })
                .collect::<Option<_>>()
                .ok_or_else(|| RuntimeError::Output { name: entry.into(), msg: "output count changed (internal error)".into() })?;
            self.exec.run(ei, &ordered, &mut bufs)?;
        }
        Ok(outs)
    }

    /// Device seconds of `runs` executions of an entry with its inputs already on the device
    /// ([`Executable::time_device`]); `None` on host backends.
    pub fn time_device(&mut self, entry: &str, inputs: &[(&str, &Tensor)], runs: usize) -> Result<Option<Vec<f64>>> {
        let ei = self.entry_index(entry)?;
        let ordered = self.ordered_inputs(ei, inputs)?;
        self.exec.time_device(ei, &ordered, runs).transpose()
    }

    /// The inputs of entry `ei` in declared order (a state not given is empty: used in place).
    fn ordered_inputs<'a>(&self, ei: usize, inputs: &[(&str, &'a Tensor)]) -> Result<Vec<&'a [u8]>> {
        self.program.entries[ei]
            .inputs
            .iter()
            .map(|io| {
                let given = inputs.iter().find(|(n, t)| *n == io.name && t.ty == io.operand.ty).map(|(_, t)| t.bytes.as_slice());
                match (given, self.program.state_index(&io.name)) {
                    (Some(b), _) => Ok(b),
                    (None, Some(_)) => Ok(&[][..]),
                    (None, None) => Err(RuntimeError::Input { name: io.name.clone(), msg: format!("missing or not {}", io.operand.ty) }),
                }
            })
            .collect()
    }

    /// Runs an entry once with each step timed: (kernel, op, seconds) per step, in order.
    pub fn profile(&mut self, entry: &str, inputs: &[(&str, &Tensor)]) -> Result<Vec<(String, &'static str, f64)>> {
        let ei = self.entry_index(entry)?;
        let ordered = self.ordered_inputs(ei, inputs)?;
        let e = &self.program.entries[ei];
        let size = |io: &kiln_graph::program::Io| if self.program.state_index(&io.name).is_some() { 0 } else { io.operand.ty.bytes() };
        let mut outs: Vec<Vec<u8>> = e.outputs.iter().map(|io| vec![0; size(io)]).collect();
        let mut bufs: Vec<&mut [u8]> = outs.iter_mut().map(|v| v.as_mut_slice()).collect();
        let mut times = Vec::with_capacity(e.steps.len());
        self.exec.run_timed(ei, &ordered, &mut bufs, &mut times)?;
        let e = &self.program.entries[ei];
        Ok(e.steps.iter().zip(times).map(|(s, t)| (s.kernel.clone(), s.op.name(), t)).collect())
    }

    /// Runs entry `ei` with caller-owned buffers in declared order; checks sizes, allocates
    /// nothing. An input or output named like a state may be empty: see [`Executable`].
    pub fn run_into(&mut self, ei: usize, inputs: &[&[u8]], outputs: &mut [&mut [u8]]) -> Result<()> {
        let e = self
            .program
            .entries
            .get(ei)
            .ok_or_else(|| RuntimeError::Entry { name: format!("#{ei}"), have: format!("{} entries", self.program.entries.len()) })?;
        if inputs.len() != e.inputs.len() || outputs.len() != e.outputs.len() {
            return Err(RuntimeError::Input {
                name: e.name.clone(),
                msg: format!(
                    "{} inputs and {} outputs given, the entry has {} and {}",
                    inputs.len(),
                    outputs.len(),
                    e.inputs.len(),
                    e.outputs.len()
                ),
            });
        }
        let state = |io: &kiln_graph::program::Io, b: usize| b == 0 && self.program.state_index(&io.name).is_some();
        for (io, b) in e.inputs.iter().zip(inputs) {
            if b.len() != io.operand.ty.bytes() && !state(io, b.len()) {
                return Err(RuntimeError::Input {
                    name: io.name.clone(),
                    msg: format!("{} bytes given, {} needs {}", b.len(), io.operand.ty, io.operand.ty.bytes()),
                });
            }
        }
        for (io, b) in e.outputs.iter().zip(outputs.iter()) {
            if b.len() != io.operand.ty.bytes() && !state(io, b.len()) {
                return Err(RuntimeError::Output {
                    name: io.name.clone(),
                    msg: format!("{} bytes given, {} needs {}", b.len(), io.operand.ty, io.operand.ty.bytes()),
                });
            }
        }
        self.exec.run(ei, inputs, outputs)
    }
}
