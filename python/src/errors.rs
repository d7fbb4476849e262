//! kiln's errors as Python exceptions: `KilnError` and one subclass per kind of mistake, each
//! carrying the message the CLI prints after `error: `.

use kiln::Error;
use kiln_runtime::RuntimeError;
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

create_exception!(kiln, KilnError, PyException, "Any error kiln reports; its message is the CLI's.");
create_exception!(kiln, InputError, KilnError, "An input of the wrong name, dtype or shape, or a missing one.");
create_exception!(kiln, ModelError, KilnError, "A checkpoint folder, config field or weight kiln cannot read.");
create_exception!(kiln, ArtifactError, KilnError, "A .kiln file that is not one, is damaged, or is of another version.");
create_exception!(kiln, BackendError, KilnError, "A backend or device this build or machine cannot run.");

/// Adds the exception classes to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("KilnError", py.get_type::<KilnError>())?;
    m.add("InputError", py.get_type::<InputError>())?;
    m.add("ModelError", py.get_type::<ModelError>())?;
    m.add("ArtifactError", py.get_type::<ArtifactError>())?;
    m.add("BackendError", py.get_type::<BackendError>())?;
    Ok(())
}

/// The Python exception for a kiln error.
pub fn to_py(e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::Model(_) | Error::Graph(_) => ModelError::new_err(msg),
        Error::Artifact(_) => ArtifactError::new_err(msg),
        Error::Runtime(r) => runtime(&r, msg),
        Error::File { .. } | Error::Usage(_) => KilnError::new_err(msg),
    }
}

fn runtime(e: &RuntimeError, msg: String) -> PyErr {
    match e {
        RuntimeError::Input { .. } | RuntimeError::Output { .. } | RuntimeError::Entry { .. } => InputError::new_err(msg),
        RuntimeError::Weights { .. } | RuntimeError::Weight { .. } | RuntimeError::Io { .. } => ModelError::new_err(msg),
        RuntimeError::Artifact(_) | RuntimeError::Invalid(_) => ArtifactError::new_err(msg),
        RuntimeError::Unsupported { .. } => BackendError::new_err(msg),
        RuntimeError::Step { .. } | RuntimeError::Graph(_) | RuntimeError::Memory(_) => KilnError::new_err(msg),
    }
}

/// An input mistake found before the runtime saw it (a dtype kiln has no name for, the CLI's
/// completion of a text model's inputs).
pub fn input(e: Error) -> PyErr {
    match e {
        Error::File { .. } | Error::Usage(_) => InputError::new_err(e.to_string()),
        other => to_py(other),
    }
}
