//! kiln: an ahead-of-time compiler and static runtime for the big_vision model family.
//!
//! The facade ties the stages together: [`compile`] runs
//! checkpoint -> graph -> passes -> schedule -> memory plan -> program, and
//! [`kiln_runtime::Session`] runs the result.

pub mod beam;
pub mod bench;
pub mod compare;
#[cfg(feature = "cuda")]
pub mod cuda_tools;
pub mod draw;
pub mod encdec;
pub mod ensemble;
pub mod fuzz;
pub mod generate;
pub mod inputs;
pub mod io;
pub mod jetformer;
pub mod launches;
pub mod load;
pub mod npz_write;
pub mod paligemma_bv;
pub mod png;
pub mod preprocess;
pub mod progress;
pub mod prompt;
pub mod rank;
pub mod sample;
pub mod sampling;
pub mod score;
pub mod seg;
pub mod select;
pub mod synth;
mod synth_rng;
pub mod tokenizer;
pub mod uvim;
pub mod uvim_heads;

pub use kiln_graph as graph;
pub use kiln_models as models;
pub use kiln_runtime as runtime;

use kiln_graph::passes::Pipeline;
use kiln_graph::plan::MemoryPlan;
use kiln_graph::program::Program;
use kiln_graph::{Graph, NodeId};
use kiln_models::Profile;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Anything the CLI or the facade can fail with.
#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] kiln_models::ModelError),
    #[error(transparent)]
    Graph(#[from] kiln_graph::GraphError),
    #[error(transparent)]
    Runtime(#[from] kiln_runtime::RuntimeError),
    #[error(transparent)]
    Artifact(#[from] kiln_graph::artifact::ArtifactError),
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("{0}")]
    Usage(String),
}

/// Result alias for the facade.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What to compile for.
#[derive(Clone, Debug)]
pub struct CompileOptions {
    pub profile: Profile,
    pub backend: String,
    /// Keep the IR after every pass (for `kiln inspect`).
    pub trace: bool,
}

/// A compiled model with everything `kiln inspect` shows.
pub struct Compiled {
    pub program: Program,
    /// One report per entry of the program, in the same order.
    pub entries: Vec<CompiledEntry>,
}

/// One entry's compile: what the passes made of its graph, its order and its memory plan.
pub struct CompiledEntry {
    pub name: String,
    /// (pass name, IR after it); the first row is the graph as built.
    pub trace: Vec<(String, String)>,
    /// The graph after the passes.
    pub graph: Graph,
    pub order: Vec<NodeId>,
    pub plan: MemoryPlan,
}

/// Compiles the model in `dir` to a program with one entry per graph the builder made
/// (`forward`, and `inverse` for flows); the entries share the weight table.
pub fn compile(dir: &Path, opts: &CompileOptions) -> Result<Compiled> {
    let built = kiln_models::build(dir, &opts.profile)?;
    compile_graph(&built.entries, &built.description, &dir.display().to_string(), opts)
}

/// Compiles built graphs, one per named entry (passes, kernel choice, schedule, plan,
/// lowering), to one program whose entries share the weight table; `source` is where its
/// weights are read from.
pub fn compile_graph(built: &[(String, Graph)], description: &str, source: &str, opts: &CompileOptions) -> Result<Compiled> {
    compile_with_states(built, description, source, vec![], opts)
}

/// [`compile_graph`] for entries sharing persistent `states` (a generation program's KV
/// cache): entry inputs and outputs named like a state are bound to it when lowered.
pub fn compile_with_states(
    built: &[(String, Graph)],
    description: &str,
    source: &str,
    states: Vec<kiln_graph::program::StateSpec>,
    opts: &CompileOptions,
) -> Result<Compiled> {
    let backend = kiln_runtime::by_name(&opts.backend)?;
    // Recorded absolute, so the artifact loads from any working directory.
    let source = match source {
        "" => String::new(),
        s => std::path::absolute(s).map(|p| p.display().to_string()).unwrap_or_else(|_| s.to_string()),
    };
    let mut program = Program::new(description.to_string(), backend.name().to_string(), source);
    program.states = states;
    let namer = |op: &kiln_graph::Op, ins: &[kiln_graph::TensorType], out: &kiln_graph::TensorType| {
        backend.kernel_for(op, ins, out).unwrap_or_else(|e| format!("unsupported: {e}"))
    };
    let mut entries = Vec::with_capacity(built.len());
    for (name, built_graph) in built {
        let mut trace = Vec::new();
        if opts.trace {
            trace.push(("built".to_string(), kiln_graph::print::print(built_graph)));
        }
        let mut pipeline = Pipeline::standard();
        if lacks_conv(built_graph, backend.as_ref()) {
            pipeline.passes.insert(0, kiln_graph::passes::Pass::LOWER_CONV);
        }
        if backend.reads_permutes_free() {
            // Prefill's Q joins the stacked K/V product, read through a permute the lowering
            // folds into its readers.
            for p in pipeline.passes.iter_mut().filter(|p| p.name == kiln_graph::passes::Pass::STACK_PROJECTIONS.name) {
                *p = kiln_graph::passes::Pass::STACK_PROJECTIONS_ROWS;
            }
        }
        let graph = pipeline.run(built_graph, opts.trace.then_some(&mut trace))?;
        // A GLU's gate and up products as one step, where the backend has a kernel for it.
        let accept = |op: &kiln_graph::Op, ins: &[kiln_graph::TensorType], out: &kiln_graph::TensorType| {
            backend.kernel_for(op, ins, out).is_ok_and(|k| !backend.interpreted(&k))
        };
        let graph = kiln_graph::passes::gated_matmul(&graph, &accept)?;
        if opts.trace {
            trace.push(("gated_matmul".to_string(), kiln_graph::print::print(&graph)));
        }
        check_kernels(&graph, backend.as_ref())?;
        let (entry, order, plan) = kiln_graph::lower::compile_entry(&graph, name, &mut program, &namer)?;
        program.entries.push(entry);
        entries.push(CompiledEntry { name: name.clone(), trace, graph, order, plan });
    }
    backend.name_kernels(&mut program);
    Ok(Compiled { program, entries })
}

/// Whether the graph has a convolution the backend has no kernel for: the compile then rewrites
/// every convolution as a gather and a matmul (`passes::lower_conv`).
fn lacks_conv(graph: &Graph, backend: &dyn kiln_runtime::Backend) -> bool {
    graph.nodes.iter().any(|n| {
        let tys: Vec<_> = n.inputs.iter().map(|i| graph.ty(*i).clone()).collect();
        matches!(n.op, kiln_graph::Op::Conv(_)) && backend.kernel_for(&n.op, &tys, &n.ty).is_err()
    })
}

/// Every step must have a kernel on the chosen backend: say which op cannot, before lowering.
fn check_kernels(graph: &Graph, backend: &dyn kiln_runtime::Backend) -> Result<()> {
    for n in &graph.nodes {
        if n.op.is_source() {
            continue;
        }
        let tys: Vec<_> = n.inputs.iter().map(|i| graph.ty(*i).clone()).collect();
        backend.kernel_for(&n.op, &tys, &n.ty).map_err(|msg| Error::Usage(format!("backend {}: {msg}", backend.name())))?;
    }
    Ok(())
}
