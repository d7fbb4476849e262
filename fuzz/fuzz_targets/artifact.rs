#![no_main]
//! `kiln::fuzz::artifact` under libFuzzer.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let fixtures = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures"));
    kiln::fuzz::run("artifact", fixtures, data);
});
