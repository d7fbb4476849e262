#![no_main]
//! `kiln::fuzz::tokenizer_json` under libFuzzer.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let fixtures = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures"));
    kiln::fuzz::run("tokenizer_json", fixtures, data);
});
