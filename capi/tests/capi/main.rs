//! kiln-capi's tests: the C ABI against the Rust API on the shipped tiny model, bad input,
//! threads, persistent states (a generation program from a Gemma fixture), the generated
//! header, the shipped artifact's freshness, and the C example built with the system compiler.

mod abi;
mod bad_input;
mod c_example;
mod common;
mod ensemble;
mod header;
mod prepared;
mod states;
mod threads;
mod tiny;
