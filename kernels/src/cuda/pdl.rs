//! Programmatic dependent launch (PDL) in kiln's kernels: with it (`CudaBackend::pdl`, a load
//! option of kiln-runtime) a kernel may start while the one before it still runs, so each
//! kernel must execute `griddepcontrol.wait` (`pdl_wait()` in `common.cuh`) before it reads
//! what another kernel wrote or stores anything. [`order`] checks that in a module's PTX.

/// The PTX symbol every module built from `common.cuh` defines: the runtime launches a
/// module's kernels with the PDL attribute only where its CUBIN has it.
pub const MARKER: &str = "kiln_pdl_waits";

/// The opcode of a PTX instruction line (`ld.global.nc.v4.u32` of
/// `@%p1 ld.global.nc.v4.u32 {...}, [%rd4];`), or `None` for a label, directive or comment.
fn opcode(line: &str) -> Option<&str> {
    let mut l = line.trim();
    if l.starts_with('@') {
        l = l.split_once(char::is_whitespace)?.1.trim_start();
    }
    let op = l.split(|c: char| c.is_whitespace() || c == ';').next()?;
    let first = op.chars().next()?;
    (first.is_ascii_lowercase() && !l.ends_with(':')).then_some(op)
}

/// Whether `op` may touch memory another kernel writes (or reads): a global or generic load,
/// store, atomic or reduction, an async copy, a call (a function body not inlined).
fn touches_memory(op: &str) -> bool {
    let space_ok = |rest: &str| [".param", ".shared", ".local", ".const"].iter().any(|s| rest.starts_with(s));
    if let Some(rest) = op.strip_prefix("ldu").or_else(|| op.strip_prefix("ld")).or_else(|| op.strip_prefix("st")) {
        return rest.starts_with('.') && !space_ok(rest);
    }
    if let Some(rest) = op.strip_prefix("atom").or_else(|| op.strip_prefix("red")) {
        return rest.starts_with('.') && !rest.starts_with(".shared");
    }
    op.starts_with("cp.async") || op == "call" || op.starts_with("call.")
}

/// Each `.entry` of `ptx` with what breaks the rule in it: no `griddepcontrol.wait`, or an
/// instruction that touches memory (see [`touches_memory`]) before the first one. Only
/// prefetches (`prefetch.global.L2`, weights) and parameter, shared and local accesses may
/// come first. Entries in source order; an empty `Vec` for an entry that keeps the rule.
pub fn order(ptx: &str) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    let mut waited = true;
    for line in ptx.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix(".visible .entry ").or_else(|| t.strip_prefix(".entry ")) {
            if let Some((_, problems)) = out.last_mut().filter(|_| !waited) {
                problems.push("no griddepcontrol.wait".into());
            }
            out.push((rest.split('(').next().unwrap_or(rest).trim().to_string(), Vec::new()));
            waited = false;
            continue;
        }
        if t.starts_with(".func") || t.starts_with(".visible .func") || t.starts_with(".weak .func") {
            if let Some((_, problems)) = out.last_mut().filter(|_| !waited) {
                problems.push("no griddepcontrol.wait".into());
            }
            waited = true; // a function body: not an entry's
            continue;
        }
        let Some(op) = opcode(t) else { continue };
        if op == "griddepcontrol.wait" {
            waited = true;
        } else if !waited && touches_memory(op) {
            if let Some((_, problems)) = out.last_mut() {
                problems.push(format!("{t} before griddepcontrol.wait"));
            }
        }
    }
    if let Some((_, problems)) = out.last_mut().filter(|_| !waited) {
        problems.push("no griddepcontrol.wait".into());
    }
    out
}

/// The PTX of entry `name` (from its `.entry` line to the next entry or function).
pub fn entry_text<'a>(ptx: &'a str, name: &str) -> Option<&'a str> {
    let start = ptx.find(&format!(".entry {name}("))?;
    let rest = &ptx[start + 1..];
    let end = [rest.find(".entry "), rest.find(".func ")].into_iter().flatten().min().unwrap_or(rest.len());
    Some(&ptx[start..start + 1 + end])
}

#[cfg(test)]
mod tests {
    use super::*;

    const PTX: &str = "
.visible .entry good(
\t.param .align 8 .b8 good_param_0[72]
)
{
\tld.param.u64 \t%rd1, [good_param_0];
\t// begin inline asm
\tprefetch.global.L2 [%rd1];
\t// end inline asm
\tgriddepcontrol.wait;
\tld.global.nc.v4.u32 \t{%r1, %r2, %r3, %r4}, [%rd1];
\tst.global.u32 \t[%rd1], %r1;
}
.visible .entry early_store(
\t.param .align 8 .b8 early_store_param_0[72]
)
{
$L__BB1_1:
\tld.param.u64 \t%rd1, [early_store_param_0];
\t@%p1 st.u32 \t[%rd1], %r1;
\tgriddepcontrol.wait;
}
.visible .entry never(
)
{
\tst.shared.u32 \t[%r1], %r2;
\tatom.global.add.u32 \t%r3, [%rd1], 1;
}
";

    #[test]
    fn finds_stores_and_loads_before_the_wait_and_a_missing_wait() {
        let r = order(PTX);
        let names: Vec<&str> = r.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["good", "early_store", "never"]);
        assert!(r[0].1.is_empty(), "{:?}", r[0].1);
        assert_eq!(r[1].1.len(), 1, "{:?}", r[1].1);
        assert!(r[1].1[0].starts_with("@%p1 st.u32"), "{:?}", r[1].1);
        assert!(r[2].1.iter().any(|p| p.starts_with("atom.global.add.u32")), "{:?}", r[2].1);
        assert!(r[2].1.iter().any(|p| p == "no griddepcontrol.wait"), "{:?}", r[2].1);
        assert!(!r[2].1.iter().any(|p| p.starts_with("st.shared")), "{:?}", r[2].1);
    }

    #[test]
    fn reads_opcodes() {
        assert_eq!(opcode("\t@!%p2 bra.uni \t$L__BB0_3;"), Some("bra.uni"));
        assert_eq!(opcode("$L__BB0_3:"), None);
        assert_eq!(opcode("// begin inline asm"), None);
        assert!(touches_memory("ld.global.nc.L1::no_allocate.L2::256B.v4.u32") && touches_memory("ld.u32"));
        assert!(!touches_memory("ld.param.u64") && !touches_memory("st.shared.v4.f32") && !touches_memory("prefetch.global.L2"));
        assert!(touches_memory("red.global.add.f32") && touches_memory("call.uni") && !touches_memory("ret"));
    }

    #[test]
    fn finds_an_entry_text() {
        let t = entry_text(PTX, "early_store").unwrap();
        assert!(t.contains("st.u32") && !t.contains("never") && !t.contains("prefetch"));
    }
}
