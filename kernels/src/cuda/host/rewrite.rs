//! The rewrites of a module's preprocessed text (g++ -E with `shim.h` prepended) that make it
//! host C++: inline PTX into calls of `ptx.h`'s functions, `extern __shared__` arrays into
//! pointers to the dynamic shared memory, `__shared__` into `static`, and a by-pointer wrapper
//! after every kernel entry.

/// Each inline PTX template the kernels use (whitespace collapsed to single spaces), with the
/// `ptx.h` function that implements it; the function takes the asm's outputs by address, then
/// its inputs, in operand order.
pub const PTX: &[(&str, &str)] = &[
    ("cvt.f32.f16 %0, %1;", "kiln_ptx_cvt_f32_f16"),
    ("cvt.rn.bf16.f32 %0, %1;", "kiln_ptx_cvt_rn_bf16_f32"),
    ("cvt.rn.f16.f32 %0, %1;", "kiln_ptx_cvt_rn_f16_f32"),
    ("cvt.rn.bf16x2.f32 %0, %1, %2;", "kiln_ptx_cvt_rn_bf16x2_f32"),
    ("cvt.rn.f16x2.f32 %0, %1, %2;", "kiln_ptx_cvt_rn_f16x2_f32"),
    ("griddepcontrol.wait;", "kiln_ptx_nop"),
    ("griddepcontrol.launch_dependents;", "kiln_ptx_nop"),
    ("prefetch.global.L2 [%0];", "kiln_ptx_nop"),
    ("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];", "kiln_ptx_ld_v4_u32"),
    ("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];", "kiln_ptx_ld_v4_u32"),
    (
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};",
        "kiln_ptx_mma_m16n8k16<false>",
    ),
    (
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};",
        "kiln_ptx_mma_m16n8k16<true>",
    ),
    ("mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};", "kiln_ptx_mma_m16n8k8<false>"),
    ("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};", "kiln_ptx_mma_m16n8k8<true>"),
    ("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];", "kiln_ptx_ldmatrix_x4"),
    ("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];", "kiln_ptx_ldmatrix_x4_trans"),
    ("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];", "kiln_ptx_ldmatrix_x2"),
    ("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];", "kiln_ptx_ldmatrix_x2_trans"),
    ("cp.async.cg.shared.global [%0], [%1], 16, %2;", "kiln_ptx_cp_async_16"),
    ("cp.async.commit_group;", "kiln_ptx_nop"),
    ("cp.async.wait_group %0;", "kiln_ptx_nop"),
];

/// The suffix of a kernel's by-pointer wrapper: `NAME__kiln_host(const void* p)`.
pub const WRAPPER_SUFFIX: &str = "__kiln_host";

/// The module's part of preprocessed `text` (after the shim's marker) made host C++, with a
/// wrapper appended per kernel entry; the names of the entries.
pub fn host_source(text: &str, marker: &str) -> Result<(String, Vec<String>), String> {
    let at = text.find(marker).ok_or("the shim's marker is missing from the preprocessed text")?;
    let (head, body) = text.split_at(at);
    let body = rewrite_asm(body)?;
    let body = rewrite_dynamic_shared(&body)?;
    let entries = entries(&body)?;
    let mut out = String::with_capacity(head.len() + body.len() + entries.len() * 120);
    out.push_str(head);
    out.push_str(&body.replace("KILN_SHARED", "static").replace("KILN_GLOBAL", ""));
    for (name, ty) in &entries {
        out.push_str(&format!(
            "\nextern \"C\" __attribute__((visibility(\"default\"))) void {name}{WRAPPER_SUFFIX}(const void* p) {{ {name}(*(const {ty}*)p); }}"
        ));
    }
    out.push('\n');
    Ok((out, entries.into_iter().map(|(n, _)| n).collect()))
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// The index one past the string or character literal starting at `i` (a quote).
fn skip_literal(b: &[u8], i: usize) -> usize {
    let q = b[i];
    let mut j = i + 1;
    while j < b.len() && b[j] != q {
        j += if b[j] == b'\\' { 2 } else { 1 };
    }
    j + 1
}

/// The index of the `)` that closes the `(` at `open`.
fn closing_paren(b: &[u8], open: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut i = open;
    while i < b.len() {
        match b[i] {
            b'"' | b'\'' => {
                i = skip_literal(b, i);
                continue;
            }
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// `s` split at the top-level (outside literals and brackets) occurrences of `sep`.
fn split_top(s: &str, sep: u8) -> Vec<&str> {
    let b = s.as_bytes();
    let (mut parts, mut depth, mut start, mut i) = (Vec::new(), 0i32, 0, 0);
    while i < b.len() {
        match b[i] {
            b'"' | b'\'' => {
                i = skip_literal(b, i);
                continue;
            }
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth -= 1,
            c if c == sep && depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    parts.push(&s[start..]);
    parts
}

/// The concatenated contents of the string literals in `s` (an asm template).
fn literal_text(s: &str) -> String {
    let b = s.as_bytes();
    let (mut out, mut i) = (String::new(), 0);
    while i < b.len() {
        if b[i] == b'"' {
            let end = skip_literal(b, i);
            out.push_str(&s[i + 1..end - 1]);
            i = end;
        } else {
            i += 1;
        }
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// One asm operand `"constraint"(expr)` as an argument: outputs (`=`, `+`) by address.
fn operand(op: &str) -> Result<String, String> {
    let op = op.trim();
    let (cons, rest) = op.strip_prefix('"').and_then(|r| r.split_once('"')).ok_or_else(|| format!("asm operand `{op}`"))?;
    let expr = rest.trim();
    if !(expr.starts_with('(') && expr.ends_with(')')) {
        return Err(format!("asm operand `{op}`"));
    }
    Ok(if cons.starts_with('=') || cons.starts_with('+') { format!("&{expr}") } else { expr.to_string() })
}

/// The call that replaces the inside of `asm(...)`.
fn ptx_call(inside: &str) -> Result<String, String> {
    let parts = split_top(inside, b':');
    let template = literal_text(parts[0]);
    let f = PTX
        .iter()
        .find(|(t, _)| *t == template)
        .map(|(_, f)| *f)
        .ok_or_else(|| format!("inline PTX with no host version: `{template}`"))?;
    let mut args = Vec::new();
    for list in parts.iter().skip(1).take(2) {
        for op in split_top(list, b',').into_iter().filter(|o| !o.trim().is_empty()) {
            args.push(operand(op)?);
        }
    }
    Ok(format!("{f}({})", args.join(", ")))
}

/// Every `asm [volatile] (...)` statement of `s` replaced by the call of its host version.
fn rewrite_asm(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let (mut out, mut i, mut copied) = (String::with_capacity(s.len()), 0, 0);
    while i < b.len() {
        match b[i] {
            b'"' | b'\'' => i = skip_literal(b, i),
            c if is_ident(c) => {
                let start = i;
                while i < b.len() && is_ident(b[i]) {
                    i += 1;
                }
                if &s[start..i] != "asm" || (start > 0 && is_ident(b[start - 1])) {
                    continue;
                }
                let mut j = i;
                while j < b.len() && b[j].is_ascii_whitespace() {
                    j += 1;
                }
                for q in ["volatile", "__volatile__"] {
                    if s[j..].starts_with(q) {
                        j += q.len();
                    }
                }
                let open = j + s[j..].find('(').ok_or("asm without operands")?;
                let close = closing_paren(b, open).ok_or("asm without a closing parenthesis")?;
                out.push_str(&s[copied..start]);
                out.push_str(&ptx_call(&s[open + 1..close])?);
                copied = close + 1;
                i = close + 1;
            }
            _ => i += 1,
        }
    }
    out.push_str(&s[copied..]);
    Ok(out)
}

/// `s` without its `__attribute__((...))` groups.
fn strip_attributes(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(at) = rest.find("__attribute__") {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        match after.find('(').and_then(|o| closing_paren(after.as_bytes(), o)) {
            Some(close) => rest = &after[close + 1..],
            None => return s.to_string(),
        }
    }
    out.push_str(rest);
    out
}

/// Each `extern __shared__ TYPE NAME[];` (after preprocessing, `extern KILN_SHARED ...`) as
/// `TYPE* NAME = (TYPE*)kiln_host_dyn_smem;`.
fn rewrite_dynamic_shared(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find("extern KILN_SHARED") {
        out.push_str(&rest[..at]);
        let decl_end = rest[at..].find(';').ok_or("`extern __shared__` without `;`")? + at;
        let decl = strip_attributes(&rest[at + "extern KILN_SHARED".len()..decl_end]);
        let decl = decl.trim().strip_suffix(']').and_then(|d| d.trim_end().strip_suffix('['));
        let decl = decl.ok_or_else(|| format!("`{}` is not `extern __shared__ TYPE NAME[]`", &rest[at..decl_end]))?.trim_end();
        let name_at = decl.rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).map_or(0, |p| p + 1);
        let (ty, name) = (decl[..name_at].trim(), &decl[name_at..]);
        out.push_str(&format!("{ty}* {name} = ({ty}*)kiln_host_dyn_smem"));
        rest = &rest[decl_end..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The kernel entries of `s`: `KILN_GLOBAL void NAME(const TYPE p)`, name and type.
fn entries(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (at, _) in s.match_indices("KILN_GLOBAL") {
        let rest = &s[at + "KILN_GLOBAL".len()..];
        let open = rest.find('(').ok_or("a kernel entry without parameters")?;
        let close = closing_paren(rest.as_bytes(), open).ok_or("a kernel entry without `)`")?;
        let head: Vec<&str> = rest[..open].split_whitespace().collect();
        let params: Vec<&str> = rest[open + 1..close].split_whitespace().collect();
        match (head.as_slice(), params.as_slice()) {
            (["void", name], ["const", ty, _]) => out.push((name.to_string(), ty.to_string())),
            _ => return Err(format!("kernel entry `{}` is not `void NAME(const TYPE p)`", rest[..=close].trim())),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_asm_with_outputs_by_address() {
        let s = r#"int f(float x) { bf16 r; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.bits) : "f"(x)); asm volatile("griddepcontrol.wait;" ::: "memory"); }"#;
        let out = rewrite_asm(s).unwrap();
        assert!(out.contains("kiln_ptx_cvt_rn_bf16_f32(&(r.bits), (x));"), "{out}");
        assert!(out.contains("kiln_ptx_nop();"), "{out}");
        let split = r#"asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, "
            "{%6}, {%0,%1,%2,%3};" : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a[0]), "r"(a[1]), "r"(b));"#;
        let out = rewrite_asm(split).unwrap();
        assert_eq!(out, "kiln_ptx_mma_m16n8k8<true>(&(c[0]), &(c[1]), &(c[2]), &(c[3]), (a[0]), (a[1]), (b));");
        assert!(rewrite_asm(r#"asm("add.f32 %0, %1;" : "=f"(a) : "f"(b));"#).unwrap_err().contains("add.f32"));
        assert_eq!(rewrite_asm("int basm = 1; // \"asm(\"").unwrap(), "int basm = 1; // \"asm(\"");
    }

    #[test]
    fn rewrites_dynamic_shared_memory_and_finds_entries() {
        let s = "void k() { extern KILN_SHARED __attribute__((aligned(16))) unsigned short smem[]; }";
        assert_eq!(rewrite_dynamic_shared(s).unwrap(), "void k() { unsigned short* smem = (unsigned short*)kiln_host_dyn_smem; }");
        let s = r#"extern "C" KILN_GLOBAL void  a_f32(const P p) { } extern "C" KILN_GLOBAL void b(const Q q) {}"#;
        assert_eq!(entries(s).unwrap(), [("a_f32".to_string(), "P".to_string()), ("b".to_string(), "Q".to_string())]);
        assert!(entries("KILN_GLOBAL void c(int n) {}").is_err());
    }
}
