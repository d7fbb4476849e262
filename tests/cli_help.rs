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

/// The flags `scripts/device_cuda.sh` passes to each `kiln` command (directly, or to `kiln
/// bench` through its `kbench` helper) are flags of that command: the script runs only on a
/// lent GPU machine, where an unknown flag would cost a run.
#[test]
fn the_device_script_passes_only_flags_its_commands_take() {
    let script = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/device_cuda.sh")).unwrap();
    let mut checked = 0;
    for line in script.lines().map(str::trim).filter(|l| !l.starts_with('#')) {
        let (cmd, rest) = if let Some(i) = line.find("\"$kiln\" ") {
            let rest = &line[i + 8..];
            let mut words = rest.split_whitespace();
            let sub = words.next().unwrap_or_default();
            let cmd = match (sub, words.next()) {
                ("bench" | "kernels", Some(w @ ("kernels" | "check"))) => vec![sub, w],
                _ => vec![sub],
            };
            (cmd, rest)
        } else if let Some(i) = line.find("kbench ").filter(|_| !line.starts_with("kbench()")) {
            (vec!["bench"], &line[i + 7..])
        } else {
            continue;
        };
        if !cmd[0].chars().all(|c| c.is_ascii_lowercase()) || cmd[0].is_empty() {
            continue;
        }
        // The command's own words end at a redirection, a pipe or the end of a substitution.
        let words = rest.split(['>', '|', ')']).next().unwrap_or_default();
        let flags: Vec<&str> = words.split_whitespace().filter(|w| w.starts_with("--")).map(|w| w.split('=').next().unwrap()).collect();
        if flags.is_empty() {
            continue;
        }
        let mut args = cmd.clone();
        args.push("--help");
        let help = String::from_utf8_lossy(&kiln(&args).stdout).into_owned();
        for f in flags {
            let known = help.lines().any(|l| l.trim_start().split([' ', ',']).any(|w| w == f));
            assert!(known, "scripts/device_cuda.sh: `kiln {}` has no {f} (line: {line})", cmd.join(" "));
            checked += 1;
        }
    }
    assert!(checked >= 20, "the script's kiln command lines were found ({checked} flags)");
}
