//! `kiln._kiln`: the native half of the Python package (`python/python/kiln` wraps it).
//!
//! Everything here calls the Rust code paths the CLI uses: [`kiln::compile`] and
//! [`kiln::generate::generation_program`] to compile, [`kiln_runtime::Session`] to run, the
//! CLI's input completion ([`kiln::inputs`]), [`kiln::generate::Generator`] and
//! [`kiln::prompt`] to generate. Errors keep the CLI's messages; their class says what kind of
//! mistake it was. The Python side only turns arrays into (dtype, shape, address, length)
//! views and bytes back into arrays.

mod artifact;
mod errors;
mod session;

use pyo3::prelude::*;

/// The module `kiln._kiln`.
#[pymodule]
fn _kiln(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<artifact::Artifact>()?;
    m.add_class::<session::Session>()?;
    m.add_function(wrap_pyfunction!(artifact::compile, m)?)?;
    m.add_function(wrap_pyfunction!(session::load, m)?)?;
    errors::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
