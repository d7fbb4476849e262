//! The example C program: built by `examples/c/build.sh` with the system C compiler against
//! the static library cargo built for these tests, run on the shipped model, and its printed
//! outputs compared bit for bit with the Rust API's; then run again under valgrind.

use crate::common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `libkiln_capi.a` from the build these tests belong to: cargo compiles the library with all
/// its crate types (staticlib included) before the test binary, into the test's `deps/`
/// folder. (`target/<profile>/libkiln_capi.a` is only refreshed by `cargo build`.)
fn static_lib() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let deps = exe.parent().expect("target/<profile>/deps/<test>");
    let lib = deps.join("libkiln_capi.a");
    assert!(lib.is_file(), "{} is missing: cargo should have built it with this test", lib.display());
    lib
}

fn show(o: &Output) -> String {
    format!("status {}\nstdout:\n{}\nstderr:\n{}", o.status, String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Builds the example with `build.sh` (extra `cflags`), into `out`.
fn build(out: &Path, cflags: &str) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/c/build.sh");
    let o = Command::new("sh")
        .arg(&script)
        .arg(static_lib())
        .arg(out)
        .env("CFLAGS", cflags)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(
        o.status.success(),
        "building the C example failed (is a C compiler installed? `cc --version`; scripts/test.sh installs one):\n{}",
        show(&o)
    );
}

/// The program's arguments: artifact, weights, input files.
fn args() -> Vec<PathBuf> {
    let dir = crate::tiny::dir();
    vec![artifact(), weights(), dir.join("x.bin"), dir.join("bias.bin")]
}

/// Parses the printed outputs: (name, little-endian bytes) per `output` block.
fn parse(stdout: &str) -> Vec<(String, Vec<u8>)> {
    let mut outs: Vec<(String, Vec<u8>)> = Vec::new();
    for line in stdout.lines() {
        if let Some(rest) = line.strip_prefix("output ") {
            let name = rest.split_whitespace().next().expect("an output name");
            outs.push((name.to_string(), Vec::new()));
        } else if let (Some(hex), Some(cur)) = (line.strip_prefix("  "), outs.last_mut()) {
            let bits = hex.split_whitespace().next().expect("bits");
            let v = u32::from_str_radix(bits, 16).unwrap_or_else(|e| panic!("{line:?}: {e}"));
            cur.1.extend_from_slice(&v.to_le_bytes());
        }
    }
    outs
}

fn temp_program(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("kiln-capi-{}-{name}", std::process::id()))
}

#[test]
fn c_example_prints_the_rust_outputs() {
    let exe = temp_program("example");
    build(&exe, "-O1");
    let o = Command::new(&exe).args(args()).output().expect("running the example");
    assert!(o.status.success(), "{}", show(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("entry forward: 2 inputs, 2 outputs"), "{stdout}");
    assert!(stdout.contains("run of an unknown entry: status 9: no entry 'no_such_entry'"), "{stdout}");
    let got = parse(&stdout);
    let want = rust_outputs(&inputs());
    assert_eq!(got.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["hidden", "probs"]);
    for ((gn, g), (wn, w)) in got.iter().zip(&want) {
        assert_eq!(gn, wn);
        assert!(g == w, "output '{gn}' printed by the C program differs from the Rust API's");
    }
    // A wrong input file is reported, not crashed on.
    let mut bad = args();
    bad[2] = weights();
    let o = Command::new(&exe).args(&bad).output().expect("running the example");
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("expected exactly 64 bytes"), "{}", show(&o));
    let _ = std::fs::remove_file(exe);
}

#[test]
fn c_example_is_clean_under_valgrind() {
    let exe = temp_program("example-vg");
    build(&exe, "-O0 -g");
    let o = Command::new("valgrind")
        .args(["--error-exitcode=99", "--leak-check=full", "--errors-for-leak-kinds=definite", "--quiet"])
        .arg(&exe)
        .args(args())
        .output()
        .unwrap_or_else(|e| panic!("valgrind: {e} (scripts/test.sh installs it)"));
    assert!(o.status.success(), "valgrind reports errors:\n{}", show(&o));
    let _ = std::fs::remove_file(exe);
}
