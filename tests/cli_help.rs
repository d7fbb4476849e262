//! The CLI's own text (issue 20): every argument of every command's `--help` has a description,
//! `--backend` names cuda, and the cube backend prints nothing about XDG_RUNTIME_DIR on a
//! machine without one.

use std::process::Command;

fn kiln(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().unwrap()
}

/// Arguments in a `--help` text with no description: a flag or positional line with nothing
/// after it, neither on the line nor (clap's next-line layout) indented below it.
fn undocumented(help: &str) -> Vec<String> {
    let lines: Vec<&str> = help.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let is_arg = |l: &str| indent(l) >= 2 && matches!(l.trim_start().chars().next(), Some('-' | '<' | '['));
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        if !is_arg(l) || l.trim().contains("  ") {
            continue;
        }
        let next = lines.get(i + 1).copied().unwrap_or("");
        if next.trim().is_empty() || indent(next) <= indent(l) + 2 || is_arg(next) {
            out.push(l.trim().to_string());
        }
    }
    out
}

#[test]
fn every_argument_has_a_description() {
    let commands: [&[&str]; 15] = [
        &["compile"],
        &["run"],
        &["generate"],
        &["inspect"],
        &["bench"],
        &["bench", "kernels"],
        &["sample"],
        &["score"],
        &["compare"],
        &["rank"],
        &["ensemble", "select"],
        &["synth"],
        &["kernels", "check"],
        &["kernels"],
        &["ensemble"],
    ];
    let mut missing = Vec::new();
    for c in commands {
        let mut args = c.to_vec();
        args.push("--help");
        let o = kiln(&args);
        assert!(o.status.success(), "{args:?}");
        let help = String::from_utf8_lossy(&o.stdout).into_owned();
        missing.extend(undocumented(&help).into_iter().map(|a| format!("kiln {}: {a}", c.join(" "))));
        if matches!(c, ["run"] | ["compile"] | ["generate"]) {
            assert!(help.contains("cuda"), "kiln {} --help: --backend names cuda", c.join(" "));
        }
    }
    assert!(missing.is_empty(), "arguments without a description:\n{}", missing.join("\n"));
    // The checker itself finds an argument left bare.
    assert_eq!(undocumented("Options:\n      --bare <X>\n      --ok <Y>  says what\n"), ["--bare <X>"]);
}

#[test]
fn the_cube_backend_says_nothing_about_xdg_runtime_dir() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/big_vision/vit_map_learn");
    let out = std::env::temp_dir().join(format!("kiln-xdg-{}.safetensors", std::process::id()));
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["run", dir.to_str().unwrap(), "--inputs", dir.join("reference.safetensors").to_str().unwrap(), "--backend", "cube"])
        .arg("--out")
        .arg(&out)
        .env_remove("XDG_RUNTIME_DIR")
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&out);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(!err.contains("XDG_RUNTIME_DIR"), "{err}");
}
