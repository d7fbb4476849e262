//! Persistent states through the C ABI: a generation program compiled from the Gemma 2 fixture
//! (`kiln::generate::generation_program`, saved as an artifact as `kiln compile --generate`
//! does) and driven through the C functions only: reset, `prefill` on the left-padded bucket,
//! `decode` steps with the KV cache passed as NULL/0, each step's ids chosen by the program's
//! last kernel (greedy `sampling` inputs; the host reads ids, not logits). The ids must be
//! transformers' reference `sequences` and what `kiln::generate::Generator` makes.

use crate::common::*;
use kiln_capi::*;
use kiln_runtime::Tensor;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Prompt tokens added to the fixture's length to make the bucket (kiln pads them on the left).
const EXTRA: usize = 3;
/// New tokens per row, as in the reference.
const MAX_NEW: usize = 6;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/gemma/gemma2_gqa")
}

/// The compiled artifact and what driving it takes, made once per test binary.
struct Gen {
    artifact: PathBuf,
    weights: PathBuf,
    /// Batch, prompt length, bucket, cache capacity, vocabulary.
    b: usize,
    l: usize,
    s: usize,
    c: usize,
    eos: Vec<i64>,
    pad: i64,
    layers: usize,
    ids: Vec<i64>,
    mask: Vec<i64>,
    want: Vec<i64>,
}

fn read(path: &Path) -> Vec<(String, Tensor)> {
    kiln::io::read(path).unwrap_or_else(|e| panic!("{e}"))
}

fn get_i64(ts: &[(String, Tensor)], name: &str) -> (Vec<usize>, Vec<i64>) {
    let t = &ts.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no {name}")).1;
    (t.ty.shape.to_vec(), t.to_f64().iter().map(|&x| x as i64).collect())
}

fn gen() -> &'static Gen {
    static GEN: OnceLock<Gen> = OnceLock::new();
    GEN.get_or_init(|| {
        let dir = fixture();
        let (shape, ids) = get_i64(&read(&dir.join("inputs.safetensors")), "input_ids");
        let (_, mask) = get_i64(&read(&dir.join("inputs.safetensors")), "attention_mask");
        let (_, want) = get_i64(&read(&dir.join("reference.safetensors")), "sequences");
        let (b, l) = (shape[0], shape[1]);
        let g = kiln::generate::generation_program(&dir, b, l + EXTRA, MAX_NEW, "cpu", kiln_graph::DType::F32).expect("compile");
        let out = std::env::temp_dir().join(format!("kiln-capi-{}-states", std::process::id()));
        std::fs::create_dir_all(&out).expect("temp dir");
        let artifact = out.join("gemma2_gqa.generate.kiln");
        kiln_graph::artifact::save_file(&artifact, &g.program).expect("save");
        Gen {
            artifact,
            weights: dir.join("model.safetensors"),
            b,
            l,
            s: l + EXTRA,
            c: g.meta.capacity,
            eos: g.meta.eos,
            pad: g.meta.pad,
            layers: g.program.states.len() / 2,
            ids,
            mask,
            want,
        }
    })
}

fn open_gen() -> Handle {
    let g = gen();
    open(&g.artifact, &g.weights).unwrap_or_else(|(st, m)| panic!("open: {st:?}: {m}"))
}

fn i64_bytes(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn i64s(b: &[u8]) -> Vec<i64> {
    b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect()
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Entry `entry`'s inputs or outputs as the C ABI describes them: (name, dtype, bytes).
fn declared(h: &Handle, entry: &str, input: bool) -> Vec<(String, KilnDtype, usize)> {
    let e = c(entry);
    let mut n = 0;
    // SAFETY: a live session, a C string and an out-pointer.
    let st = unsafe {
        if input {
            kiln_session_input_count(h.0, e.as_ptr(), &mut n)
        } else {
            kiln_session_output_count(h.0, e.as_ptr(), &mut n)
        }
    };
    assert_eq!(st, KilnStatus::Ok, "{}", last_error());
    (0..n)
        .map(|i| {
            let mut info = std::mem::MaybeUninit::<KilnIoInfo>::uninit();
            // SAFETY: as above.
            let st = unsafe {
                if input {
                    kiln_session_input_info(h.0, e.as_ptr(), i, info.as_mut_ptr())
                } else {
                    kiln_session_output_info(h.0, e.as_ptr(), i, info.as_mut_ptr())
                }
            };
            assert_eq!(st, KilnStatus::Ok, "{}", last_error());
            // SAFETY: written on success.
            let info = unsafe { info.assume_init() };
            (from_c(info.name), info.dtype, info.bytes)
        })
        .collect()
}

/// Runs `entry` with the named buffers given; every other input and output (the states) is
/// passed as NULL with 0 bytes.
fn run_named(h: &Handle, entry: &str, inputs: &[(&str, &[u8])], outputs: &mut [(&str, &mut Vec<u8>)]) -> KilnStatus {
    let names_in: Vec<(CString, KilnDtype, Option<&[u8]>)> = declared(h, entry, true)
        .into_iter()
        .map(|(n, d, _)| {
            let given = inputs.iter().find(|(k, _)| *k == n).map(|(_, b)| *b);
            (c(&n), d, given)
        })
        .collect();
    let ins: Vec<KilnInput> = names_in
        .iter()
        .map(|(n, d, b)| match b {
            Some(b) => KilnInput { name: n.as_ptr(), dtype: *d, data: b.as_ptr().cast(), bytes: b.len() },
            None => KilnInput { name: n.as_ptr(), dtype: *d, data: std::ptr::null(), bytes: 0 },
        })
        .collect();
    let decl_out = declared(h, entry, false);
    let names_out: Vec<CString> = decl_out.iter().map(|(n, _, _)| c(n)).collect();
    let outs: Vec<KilnOutput> = decl_out
        .iter()
        .zip(&names_out)
        .map(|((n, d, _), cn)| match outputs.iter_mut().find(|(k, _)| k == n) {
            Some((_, b)) => KilnOutput { name: cn.as_ptr(), dtype: *d, data: b.as_mut_ptr().cast(), bytes: b.len() },
            None => KilnOutput { name: cn.as_ptr(), dtype: *d, data: std::ptr::null_mut(), bytes: 0 },
        })
        .collect();
    run_raw(h, entry, &ins, &outs)
}

/// The prefill inputs as `Generator` makes them: each row left-padded to the bucket with the
/// pad id, the mask over the whole cache `[B, C]` (zeros after the bucket), positions
/// `cumsum(mask) - 1` (1 at padding), and each row's next position.
fn prefill_inputs(g: &Gen) -> (Vec<i64>, Vec<i64>, Vec<i64>, Vec<i64>) {
    let (b, l, s, c) = (g.b, g.l, g.s, g.c);
    let extra = s - l;
    let mut ids = vec![g.pad; b * s];
    let mut mask = vec![0i64; b * c];
    for r in 0..b {
        ids[r * s + extra..(r + 1) * s].copy_from_slice(&g.ids[r * l..(r + 1) * l]);
        mask[r * c + extra..r * c + s].copy_from_slice(&g.mask[r * l..(r + 1) * l]);
    }
    let mut pos = vec![0i64; b * s];
    let mut next_pos = vec![0i64; b];
    for r in 0..b {
        let mut acc = 0;
        for j in 0..s {
            acc += mask[r * c + j];
            pos[r * s + j] = if mask[r * c + j] == 0 { 1 } else { acc - 1 };
        }
        next_pos[r] = acc;
    }
    (ids, mask, pos, next_pos)
}

/// The selection step's runtime inputs for greedy decoding (temperature 0, top-p 1; top-k,
/// seed and step 0): what `kiln::select::inputs(None, _)` gives.
fn greedy() -> (Vec<u8>, Vec<u8>) {
    ([0f32, 1.0].iter().flat_map(|x| x.to_le_bytes()).collect(), i64_bytes(&[0, 0, 0, 0]))
}

/// Runs prefill on a freshly reset session: the chosen ids `[B]` (the program's last kernel
/// picks them; the host reads no logits), the cache mask and positions.
fn prefill(h: &Handle, g: &Gen) -> (Vec<i64>, Vec<i64>, Vec<i64>) {
    // SAFETY: a live session.
    assert_eq!(unsafe { kiln_session_reset_states(h.0) }, KilnStatus::Ok, "{}", last_error());
    let (ids, mask, pos, next_pos) = prefill_inputs(g);
    let (b, s, c) = (g.b, g.s, g.c);
    let prefill_mask: Vec<i64> = (0..b).flat_map(|r| mask[r * c..r * c + s].to_vec()).collect();
    let (ids, pm, pos) = (i64_bytes(&ids), i64_bytes(&prefill_mask), i64_bytes(&pos));
    let (opts, ctr) = greedy();
    let (mut chosen, mut lp) = (vec![0u8; b * 8], vec![0u8; b * 4]);
    let ins = [("input_ids", &ids[..]), ("attention_mask", &pm), ("position_ids", &pos), ("sampling", &opts), ("sampling_counters", &ctr)];
    let st = run_named(h, "prefill", &ins, &mut [("ids", &mut chosen), ("logprobs", &mut lp)]);
    assert_eq!(st, KilnStatus::Ok, "{}", last_error());
    assert!(f32s(&lp).iter().all(|&x| x <= 0.0 && x.is_finite()));
    (i64s(&chosen), mask, next_pos)
}

/// Greedy generation through the C ABI: `sequences [B, L + n]` as transformers makes them.
fn generate_c(h: &Handle, g: &Gen) -> Vec<i64> {
    let (b, l, s, c) = (g.b, g.l, g.s, g.c);
    let (mut chosen, mut mask, mut next_pos) = prefill(h, g);
    let mut seqs: Vec<Vec<i64>> = (0..b).map(|r| g.ids[r * l..(r + 1) * l].to_vec()).collect();
    let mut done = vec![false; b];
    for t in 0..MAX_NEW {
        let mut next = vec![0i64; b];
        for r in 0..b {
            next[r] = if done[r] { g.pad } else { chosen[r] };
            seqs[r].push(next[r]);
            done[r] |= g.eos.contains(&next[r]);
        }
        if done.iter().all(|&d| d) || t + 1 == MAX_NEW {
            break;
        }
        let slot = s + t;
        for r in 0..b {
            mask[r * c + slot] = 1;
        }
        let (ids, m, pos, at) = (i64_bytes(&next), i64_bytes(&mask), i64_bytes(&next_pos), i64_bytes(&[slot as i64]));
        let (opts, ctr) = greedy();
        let (mut out, mut lp) = (vec![0u8; b * 8], vec![0u8; b * 4]);
        let ins = [
            ("input_ids", &ids[..]),
            ("attention_mask", &m),
            ("position_ids", &pos),
            ("cache_position", &at),
            ("sampling", &opts),
            ("sampling_counters", &ctr),
        ];
        let st = run_named(h, "decode", &ins, &mut [("ids", &mut out), ("logprobs", &mut lp)]);
        assert_eq!(st, KilnStatus::Ok, "decode step {t}: {}", last_error());
        chosen = i64s(&out);
        next_pos.iter_mut().for_each(|p| *p += 1);
    }
    seqs.concat()
}

#[test]
fn generation_through_the_c_abi_matches_the_reference_and_the_generator() {
    let g = gen();
    let h = open_gen();
    let got = generate_c(&h, g);
    assert_eq!(got, g.want, "generated ids against transformers");
    // A second generation on the same session starts from a reset cache: the same ids.
    assert_eq!(generate_c(&h, g), g.want, "second generation");
    let mut r = kiln::generate::Generator::new(&fixture(), g.b, g.s, MAX_NEW, "cpu").expect("Generator");
    let out = r.generate(&g.ids, &g.mask, g.l, MAX_NEW, None).expect("generate");
    assert_eq!(got, out.sequences, "the C ABI against kiln::generate::Generator");
}

/// State `i`'s description.
fn state_info(h: &Handle, i: usize) -> Result<KilnIoInfo, (KilnStatus, String)> {
    let mut info = std::mem::MaybeUninit::<KilnIoInfo>::uninit();
    // SAFETY: a live session and an out-pointer.
    match unsafe { kiln_session_state_info(h.0, i, info.as_mut_ptr()) } {
        // SAFETY: written on success.
        KilnStatus::Ok => Ok(unsafe { info.assume_init() }),
        st => Err((st, last_error())),
    }
}

fn read_state(h: &Handle, i: usize, buf: &mut [u8]) -> KilnStatus {
    // SAFETY: a live session and a buffer of `buf.len()` writable bytes.
    unsafe { kiln_session_read_state(h.0, i, buf.as_mut_ptr().cast(), buf.len()) }
}

#[test]
fn states_are_described_read_and_reset() {
    let g = gen();
    let h = open_gen();
    let mut n = 0;
    // SAFETY: a live session and an out-pointer.
    assert_eq!(unsafe { kiln_session_state_count(h.0, &mut n) }, KilnStatus::Ok);
    assert_eq!(n, 2 * g.layers);
    assert!(n > 0);
    let infos: Vec<KilnIoInfo> = (0..n).map(|i| state_info(&h, i).unwrap_or_else(|(st, m)| panic!("{st:?}: {m}"))).collect();
    assert_eq!(from_c(infos[0].name), "cache.0.key");
    assert_eq!(from_c(infos[1].name), "cache.0.value");
    let info = infos[0];
    assert_eq!(info.dtype, KilnDtype::F32);
    assert_eq!(info.rank, 4);
    // SAFETY: `rank` dimensions owned by the session.
    let shape = unsafe { std::slice::from_raw_parts(info.shape, info.rank) };
    assert_eq!([shape[0], shape[1]], [g.b, g.c], "[batch, capacity, kv heads, head dim]");
    assert_eq!(info.bytes, shape.iter().product::<usize>() * 4);

    let (st, msg) = state_info(&h, n).expect_err("out of range");
    assert_eq!(st, KilnStatus::InvalidArgument);
    assert!(msg.contains(&format!("state {n} asked for")) && msg.contains(&format!("has {n}")), "{msg}");

    // Zero at open, filled by prefill, zero again after a reset.
    let mut buf = vec![0xffu8; info.bytes];
    assert_eq!(read_state(&h, 0, &mut buf), KilnStatus::Ok, "{}", last_error());
    assert!(buf.iter().all(|&x| x == 0), "a fresh session's state is zero");
    prefill(&h, g);
    for (i, info) in infos.iter().enumerate() {
        let mut buf = vec![0u8; info.bytes];
        assert_eq!(read_state(&h, i, &mut buf), KilnStatus::Ok, "{}", last_error());
        assert!(buf.iter().any(|&x| x != 0), "state {i} is filled by prefill");
    }
    // SAFETY: a live session.
    assert_eq!(unsafe { kiln_session_reset_states(h.0) }, KilnStatus::Ok);
    assert_eq!(read_state(&h, 1, &mut buf), KilnStatus::Ok, "{}", last_error());
    assert!(buf.iter().all(|&x| x == 0), "reset zeroes the state");

    // The wrong size, a NULL buffer, an index out of range.
    let mut short = vec![0u8; info.bytes - 4];
    assert_eq!(read_state(&h, 0, &mut short), KilnStatus::InvalidArgument);
    let msg = last_error();
    assert!(msg.contains("cache.0.key") && msg.contains(&format!("needs {}", info.bytes)), "{msg}");
    // SAFETY: a live session; NULL data is refused before any write.
    assert_eq!(unsafe { kiln_session_read_state(h.0, 0, std::ptr::null_mut(), info.bytes) }, KilnStatus::NullPointer);
    assert_eq!(read_state(&h, n, &mut buf), KilnStatus::InvalidArgument);
    assert!(last_error().contains(&format!("state {n} asked for")), "{}", last_error());
    // SAFETY: NULL sessions and out-pointers are refused.
    unsafe {
        assert_eq!(kiln_session_state_count(std::ptr::null(), &mut n), KilnStatus::NullPointer);
        assert_eq!(kiln_session_state_count(h.0, std::ptr::null_mut()), KilnStatus::NullPointer);
        assert_eq!(kiln_session_reset_states(std::ptr::null()), KilnStatus::NullPointer);
    }
}

#[test]
fn a_full_state_output_receives_a_copy() {
    let g = gen();
    let h = open_gen();
    // SAFETY: a live session.
    assert_eq!(unsafe { kiln_session_reset_states(h.0) }, KilnStatus::Ok);
    let (ids, mask, pos, _) = prefill_inputs(g);
    let pm: Vec<i64> = (0..g.b).flat_map(|r| mask[r * g.c..r * g.c + g.s].to_vec()).collect();
    let (ids, pm, pos) = (i64_bytes(&ids), i64_bytes(&pm), i64_bytes(&pos));
    let bytes = state_info(&h, 0).expect("state 0").bytes;
    let (mut chosen, mut lp, mut key) = (vec![0u8; g.b * 8], vec![0u8; g.b * 4], vec![0u8; bytes]);
    let (opts, ctr) = greedy();
    let st = run_named(
        &h,
        "prefill",
        &[("input_ids", &ids), ("attention_mask", &pm), ("position_ids", &pos), ("sampling", &opts), ("sampling_counters", &ctr)],
        &mut [("ids", &mut chosen), ("logprobs", &mut lp), ("cache.0.key", &mut key)],
    );
    assert_eq!(st, KilnStatus::Ok, "{}", last_error());
    let mut stored = vec![0u8; bytes];
    assert_eq!(read_state(&h, 0, &mut stored), KilnStatus::Ok, "{}", last_error());
    assert!(key.iter().any(|&x| x != 0));
    assert_eq!(key, stored, "the copied-out state is the stored one");
}

#[test]
fn a_wrong_size_state_buffer_is_an_error_naming_the_tensor() {
    let g = gen();
    let h = open_gen();
    let (ids, mask, pos, _) = prefill_inputs(g);
    let pm: Vec<i64> = (0..g.b).flat_map(|r| mask[r * g.c..r * g.c + g.s].to_vec()).collect();
    let (ids, pm, pos) = (i64_bytes(&ids), i64_bytes(&pm), i64_bytes(&pos));
    let (mut chosen, mut lp) = (vec![0u8; g.b * 8], vec![0u8; g.b * 4]);
    let mut short = vec![0u8; 16];
    let (opts, ctr) = greedy();
    let st = run_named(
        &h,
        "prefill",
        &[("input_ids", &ids), ("attention_mask", &pm), ("position_ids", &pos), ("sampling", &opts), ("sampling_counters", &ctr)],
        &mut [("ids", &mut chosen), ("logprobs", &mut lp), ("cache.1.value", &mut short)],
    );
    assert_eq!(st, KilnStatus::Output);
    let msg = last_error();
    assert!(msg.contains("'cache.1.value'") && msg.contains("16 bytes given") && msg.contains("in place"), "{msg}");

    // A state input of the wrong size in decode.
    let one = i64_bytes(&vec![0; g.b]);
    let (m, at) = (i64_bytes(&vec![1; g.b * g.c]), i64_bytes(&[g.s as i64]));
    let bad = vec![0u8; 8];
    let mut out = vec![0u8; g.b * 8];
    let sel = [("sampling", &opts[..]), ("sampling_counters", &ctr[..])];
    let ins = [("input_ids", &one[..]), ("attention_mask", &m), ("position_ids", &one), ("cache_position", &at), ("cache.2.key", &bad)];
    let st = run_named(&h, "decode", &[&ins[..], &sel[..]].concat(), &mut [("ids", &mut out), ("logprobs", &mut lp)]);
    assert_eq!(st, KilnStatus::Input);
    let msg = last_error();
    assert!(msg.contains("'cache.2.key'") && msg.contains("8 bytes given"), "{msg}");

    // NULL with 0 bytes is for states only.
    let ins = [("attention_mask", &m[..]), ("position_ids", &one), ("cache_position", &at)];
    let st = run_named(&h, "decode", &[&ins[..], &sel[..]].concat(), &mut [("ids", &mut out), ("logprobs", &mut lp)]);
    assert_eq!(st, KilnStatus::Input);
    let msg = last_error();
    assert!(msg.contains("'input_ids'") && msg.contains("0 bytes given") && !msg.contains("in place"), "{msg}");
    let ins = [("input_ids", &one[..]), ("attention_mask", &m), ("position_ids", &one), ("cache_position", &at)];
    let st = run_named(&h, "decode", &[&ins[..], &sel[..]].concat(), &mut []);
    assert_eq!(st, KilnStatus::Output);
    assert!(last_error().contains("'ids'") || last_error().contains("'logprobs'"), "{}", last_error());
}

#[test]
fn a_program_without_states_has_none() {
    let h = open_tiny();
    let mut n = 7;
    // SAFETY: a live session and an out-pointer.
    assert_eq!(unsafe { kiln_session_state_count(h.0, &mut n) }, KilnStatus::Ok);
    assert_eq!(n, 0);
    let (st, msg) = state_info(&h, 0).expect_err("no state 0");
    assert_eq!(st, KilnStatus::InvalidArgument);
    assert!(msg.contains("state 0 asked for, the artifact has 0"), "{msg}");
    // SAFETY: a live session.
    assert_eq!(unsafe { kiln_session_reset_states(h.0) }, KilnStatus::Ok, "{}", last_error());
}

/// `kiln_session_gather_state_rows` after a prefill: rows swapped ([1, 0]) then row 1 copied
/// to both ([1, 1], as samples share a prompt) are what reading the states back shows; an
/// index past the batch and a wrong row count are refused with a message, the states intact.
#[test]
fn state_rows_are_gathered_in_place() {
    let g = gen();
    let h = open_gen();
    prefill(&h, g);
    let n = 2 * g.layers;
    let read_all = |h: &Handle| -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| {
                let info = state_info(h, i).unwrap_or_else(|(st, m)| panic!("{st:?}: {m}"));
                let mut buf = vec![0u8; info.bytes];
                assert_eq!(read_state(h, i, &mut buf), KilnStatus::Ok, "{}", last_error());
                buf
            })
            .collect()
    };
    let before = read_all(&h);
    let gather = |h: &Handle, rows: &[usize]| {
        // SAFETY: a live session and `rows.len()` readable values.
        unsafe { kiln_session_gather_state_rows(h.0, rows.as_ptr(), rows.len()) }
    };
    let row = |state: &[u8], r: usize| state[r * state.len() / g.b..(r + 1) * state.len() / g.b].to_vec();
    assert_eq!(gather(&h, &[1, 0]), KilnStatus::Ok, "{}", last_error());
    for (a, b) in read_all(&h).iter().zip(&before) {
        assert_eq!([row(a, 0), row(a, 1)], [row(b, 1), row(b, 0)]);
    }
    assert!(before.iter().any(|s| row(s, 0) != row(s, 1)), "the two prompts' caches are equal: the test would not see a swap");
    assert_eq!(gather(&h, &[0, 0]), KilnStatus::Ok, "{}", last_error());
    for (a, b) in read_all(&h).iter().zip(&before) {
        assert_eq!([row(a, 0), row(a, 1)], [row(b, 1), row(b, 1)]);
    }
    let kept = read_all(&h);
    assert_ne!(gather(&h, &[0, 2]), KilnStatus::Ok);
    assert!(last_error().contains("row 2 is out of range"), "{}", last_error());
    assert_ne!(gather(&h, &[0]), KilnStatus::Ok);
    assert!(last_error().contains("leading axis must be the batch"), "{}", last_error());
    assert_eq!(read_all(&h), kept, "a refused gather changed the states");
}
