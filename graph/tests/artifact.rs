//! The `.kiln` format: programs survive a round trip bit for bit, every kind of bad file
//! gets its own error naming the file, and no byte string makes loading panic.

use kiln_graph::artifact::{fnv1a64, load, load_file, save, save_file, HEADER_BYTES, MAGIC, OLDEST_VERSION};
use kiln_graph::lower::compile_entry;
use kiln_graph::op::ResizeMode;
use kiln_graph::program::{ConstData, Entry, Io, Operand, PlanStats, Program, Slot, StateSpec, Step, WeightSpec};
use kiln_graph::{ArtifactError, Attention, BinaryOp, DType, Expr, Graph, Instr, MaskKind, Op, ReduceOp, TensorType, UnaryOp};
use proptest::prelude::*;

mod common;
use common::Rng;

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// Any f64 but NaN (NaN != NaN would make equality useless): infinities, -0, subnormals.
    fn f64(&mut self) -> f64 {
        let specials = [f64::INFINITY, f64::NEG_INFINITY, -0.0, 5e-324, 0.1 + 0.2, 1.0 / 3.0];
        let v = if self.below(4) == 0 { specials[self.below(specials.len())] } else { f64::from_bits(self.next()) };
        if v.is_nan() {
            f64::NEG_INFINITY
        } else {
            v
        }
    }
    fn f32(&mut self) -> f32 {
        let v = f32::from_bits(self.next() as u32);
        if v.is_nan() {
            f32::NEG_INFINITY
        } else {
            v
        }
    }
    fn string(&mut self) -> String {
        let pieces = ["vision", ".", "layers", "/", "é", "0", "ß", "\u{1F600}", "\"", "\\", "\n", ""];
        (0..self.below(6)).map(|_| pieces[self.below(pieces.len())]).collect()
    }
}

const DTYPES: [DType; 7] = [DType::F32, DType::F16, DType::BF16, DType::I32, DType::I64, DType::U8, DType::Bool];

fn random_ty(r: &mut Rng) -> TensorType {
    let shape: Vec<usize> = (0..r.below(4)).map(|_| 1 + r.below(7)).collect();
    TensorType::new(DTYPES[r.below(DTYPES.len())], shape)
}

fn random_expr(r: &mut Rng) -> Expr {
    let mut instrs = vec![Instr::Input(0), Instr::Const(r.f32())];
    for i in 2..2 + r.below(4) as u16 {
        instrs.push(match r.below(3) {
            0 => Instr::Unary(UnaryOp::GeluTanh, i - 1),
            1 => Instr::Binary(BinaryOp::Max, i - 1, i - 2),
            _ => Instr::Select(0, i - 1, i - 2),
        });
    }
    Expr { instrs }
}

fn random_op(r: &mut Rng) -> Op {
    let mask = [
        MaskKind::None,
        MaskKind::Causal { q_offset: r.below(9) },
        MaskKind::SlidingWindow { q_offset: r.below(9), window: r.below(99) },
        MaskKind::Additive,
        MaskKind::Positions(kiln_graph::PosMask {
            window: [None, Some(r.below(99))][r.below(2)],
            padding: r.below(2) == 0,
            prefix: r.below(2) == 0,
        }),
    ][r.below(5)];
    match r.below(12) {
        0 => Op::Unary([UnaryOp::Exp, UnaryOp::Silu, UnaryOp::Not][r.below(3)]),
        1 => Op::Binary([BinaryOp::Add, BinaryOp::Ge, BinaryOp::Pow][r.below(3)]),
        2 => Op::MatMul { transpose_b: r.below(2) == 0, epilogue: (r.below(2) == 0).then(|| random_expr(r)) },
        3 => Op::Attention(Attention { scale: r.f32(), softcap: (r.below(2) == 0).then(|| r.f32()), mask }),
        4 => Op::Fused(random_expr(r)),
        5 => Op::Iota { axis: r.below(3), start: r.f64(), step: r.f64() },
        6 => Op::Reduce { op: ReduceOp::Mean, axes: vec![0, 2], keep_dims: r.below(2) == 0 },
        7 => Op::Resize { size: [r.below(999), 7], mode: [ResizeMode::Bilinear, ResizeMode::Bicubic][r.below(2)] },
        8 => Op::Slice { axis: 1, start: r.below(5), end: 9, step: 2 },
        9 => Op::LayerNorm { eps: r.f32() },
        10 => Op::Cast { to: DTYPES[r.below(DTYPES.len())] },
        _ => Op::TopK { k: r.below(64) },
    }
}

/// A program whose every slot is consistent (what `load` checks), with random contents.
fn random_program(seed: u64) -> Program {
    let r = &mut Rng(seed);
    let weights: Vec<WeightSpec> = (0..r.below(5)).map(|_| WeightSpec { name: r.string(), ty: random_ty(r) }).collect();
    let constants: Vec<ConstData> = (0..r.below(5))
        .map(|_| {
            let ty = random_ty(r);
            ConstData { values: (0..ty.numel()).map(|_| r.f64()).collect(), ty }
        })
        .collect();
    let states: Vec<StateSpec> = (0..r.below(3)).map(|_| StateSpec { name: r.string(), ty: random_ty(r) }).collect();
    let mut entries = Vec::new();
    for _ in 0..r.below(4) {
        let mut top = 0;
        let mut operand = |r: &mut Rng| {
            let pick = r.below(3);
            if pick == 0 && !weights.is_empty() {
                let i = r.below(weights.len());
                return Operand { slot: Slot::Weight(i as u32), ty: weights[i].ty.clone() };
            }
            if pick == 1 && !constants.is_empty() {
                let i = r.below(constants.len());
                return Operand { slot: Slot::Const(i as u32), ty: constants[i].ty.clone() };
            }
            if pick == 2 && !states.is_empty() && r.below(2) == 0 {
                let i = r.below(states.len());
                return Operand { slot: Slot::State(i as u32), ty: states[i].ty.clone() };
            }
            let ty = random_ty(r);
            let offset = 256 * r.below(64);
            top = usize::max(top, offset + ty.bytes());
            Operand { slot: Slot::Arena { offset, bytes: ty.bytes() }, ty }
        };
        let inputs = (0..r.below(3)).map(|_| Io { name: r.string(), operand: operand(r) }).collect();
        let outputs = (0..r.below(3)).map(|_| Io { name: r.string(), operand: operand(r) }).collect();
        let steps = (0..r.below(6))
            .map(|_| Step {
                node: r.next() as u32,
                op: random_op(r),
                kernel: r.string(),
                inputs: (0..r.below(4)).map(|_| operand(r)).collect(),
                output: operand(r),
            })
            .collect();
        let arena_bytes = top + 256 * r.below(3);
        let plan = PlanStats { peak: arena_bytes, lower_bound: r.below(arena_bytes + 1), no_reuse: r.next() as usize };
        entries.push(Entry { name: r.string(), inputs, outputs, steps, arena_bytes, plan });
    }
    let binaries = (0..r.below(3))
        .map(|_| kiln_graph::program::Binary {
            backend: r.string(),
            arch: r.string(),
            name: r.string(),
            code: (0..r.below(64)).map(|_| r.next() as u8).collect(),
        })
        .collect();
    // Weight sets (format version 3) in about half the programs.
    let weight_sets =
        (0..r.below(2) * r.below(3)).map(|_| kiln_graph::program::WeightSet { prefix: r.string(), path: r.string() }).collect();
    // Tuning entries (format version 5) in about a third of the programs.
    let tuning = (0..(r.below(3) == 0) as usize * r.below(3))
        .map(|_| kiln_graph::tuning::TuningEntry {
            card: r.string(),
            kernel: r.string(),
            shape: r.string(),
            choice: r.string(),
            us: if r.below(2) == 0 { None } else { Some(r.next() as f64 / 7.0) },
        })
        .collect();
    Program {
        model: r.string(),
        backend: r.string(),
        source: r.string(),
        weights,
        constants,
        entries,
        states,
        binaries,
        weight_sets,
        tuning,
    }
}

/// A small real program: a graph compiled twice as two entries sharing weights.
fn compiled_program() -> Program {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[2, 8]).unwrap();
    let w = g.weight("w", DType::F32, &[4, 8]).unwrap();
    let y = g.matmul(x, w, true).unwrap();
    let m = g.constant(DType::F32, &[4], vec![0.0, f64::NEG_INFINITY, 1.5, -0.0]).unwrap();
    let y = g.add(y, m).unwrap();
    let y = g.reshape(y, &[8]).unwrap();
    g.output("y", y);
    let mut p = Program {
        model: "test".into(),
        backend: "cpu".into(),
        source: "tiny/".into(),
        weights: vec![],
        constants: vec![],
        entries: vec![],
        states: vec![StateSpec { name: "cache.0.key".into(), ty: TensorType::new(DType::F32, [1, 4, 2, 8]) }],
        binaries: vec![],
        weight_sets: vec![],
        tuning: vec![],
    };
    let namer = |op: &Op, _: &[TensorType], _: &TensorType| format!("cpu.{}", op.name());
    for name in ["forward", "again"] {
        let (e, _, _) = compile_entry(&g, name, &mut p, &namer).unwrap();
        p.entries.push(e);
    }
    p
}

fn err(bytes: &[u8]) -> String {
    match load(bytes, "model.kiln") {
        Ok(_) => panic!("loaded {} bytes that are not a valid artifact", bytes.len()),
        Err(e) => e.to_string(),
    }
}

/// An artifact around an arbitrary body, with a correct header (version 2: no weight sets).
fn wrap(body: &[u8]) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&OLDEST_VERSION.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&fnv1a64(body).to_le_bytes());
    out.extend_from_slice(body);
    out
}

proptest! {
    #[test]
    fn random_programs_round_trip(seed in any::<u64>()) {
        let p = random_program(seed);
        let bytes = save(&p);
        let q = load(&bytes, "random.kiln").unwrap();
        prop_assert_eq!(&p, &q);
        prop_assert_eq!(save(&q), bytes);
    }

    #[test]
    fn random_bytes_never_load(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        prop_assert!(load(&bytes, "noise").is_err());
    }

    #[test]
    fn random_bodies_never_panic(body in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = load(&wrap(&body), "noise");
    }

    #[test]
    fn truncations_and_bit_flips_never_load(seed in any::<u64>(), cut in any::<usize>(), bit in any::<usize>()) {
        let bytes = save(&random_program(seed));
        prop_assert!(load(&bytes[..cut % bytes.len()], "cut").is_err());
        let mut flipped = bytes.clone();
        flipped[(bit / 8) % bytes.len()] ^= 1 << (bit % 8);
        prop_assert!(load(&flipped, "flipped").is_err());
    }
}

#[test]
fn compiled_programs_round_trip_through_files() {
    let p = compiled_program();
    assert_eq!(p.weights.len(), 1, "entries share the weight");
    assert_eq!(p.constants[0].values[1], f64::NEG_INFINITY);
    let path = std::env::temp_dir().join(format!("kiln-artifact-test-{}.kiln", std::process::id()));
    save_file(&path, &p).unwrap();
    let q = load_file(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    assert_eq!(p, q);
    assert!(q.constants[0].values[3].is_sign_negative(), "-0.0 keeps its sign");
}

#[test]
fn every_single_bit_flip_is_caught() {
    let bytes = save(&compiled_program());
    for bit in 0..bytes.len() * 8 {
        let mut b = bytes.clone();
        b[bit / 8] ^= 1 << (bit % 8);
        assert!(load(&b, "flip").is_err(), "flipping bit {bit} went unnoticed");
    }
}

#[test]
fn each_bad_file_gets_its_own_message() {
    let good = save(&compiled_program());
    let n = good.len();

    assert!(err(b"").contains("model.kiln: not a kiln artifact: it looks like an empty file"), "{}", err(b""));
    let mut st = 2u64.to_le_bytes().to_vec();
    st.extend_from_slice(b"{}");
    assert!(err(&st).contains("looks like a safetensors file"), "{}", err(&st));
    assert!(err(b"  {\"model\": 1}").contains("looks like JSON text"));
    assert!(err(b"PK\x03\x04rest").contains("zip archive"));
    assert!(err(b"hello world, not a model").contains("text starting \"hello world"), "{}", err(b"hello world, not a model"));
    assert!(err(&[0xff, 0, 1, 2, 3, 4, 5, 6, 7]).contains("binary data starting ff 00 01"));

    let mut v = good.clone();
    v[8..12].copy_from_slice(&8u32.to_le_bytes());
    assert_eq!(err(&v), "model.kiln: made by format version 8, this kiln reads versions 2 to 7: recompile it with `kiln compile`");

    assert_eq!(err(&good[..n - 10]), format!("model.kiln: truncated: expected {n} bytes, found {}", n - 10));
    assert_eq!(err(b"KILN"), format!("model.kiln: truncated: expected {HEADER_BYTES} bytes, found 4"));
    assert_eq!(err(&good[..20]), format!("model.kiln: truncated: expected {HEADER_BYTES} bytes, found 20"));

    let mut long = good.clone();
    long.push(0);
    assert!(err(&long).contains(&format!("unexpected bytes after the program: expected {n} bytes, found {}", n + 1)));

    let mut corrupt = good.clone();
    corrupt[n - 1] ^= 0x40;
    let msg = err(&corrupt);
    assert!(msg.starts_with("model.kiln: checksum mismatch (stored ") && msg.ends_with("): the file is corrupt"), "{msg}");

    let msg = err(&wrap(b"\x05\x00\x00\x00\x00\x00\x00\x00abc"));
    assert!(msg.starts_with("model.kiln: the program does not parse: "), "{msg}");
    let mut trailing_body = save(&compiled_program())[HEADER_BYTES..].to_vec();
    trailing_body.push(9);
    assert_eq!(err(&wrap(&trailing_body)), "model.kiln: the program does not parse: 1 bytes left over after the program");

    let mut bad = compiled_program();
    bad.entries[0].steps[0].output.slot = Slot::Arena { offset: 1 << 20, bytes: 32 };
    let msg = err(&save(&bad));
    assert!(msg.starts_with("model.kiln: the program is inconsistent: entry 'forward', step 0 (%2 matmul): "), "{msg}");
    assert!(msg.contains("lie outside the"), "{msg}");

    let missing = std::env::temp_dir().join("kiln-no-such-file.kiln");
    let e = load_file(&missing).unwrap_err();
    assert!(matches!(e, ArtifactError::Io { .. }));
    assert!(e.to_string().starts_with(&missing.display().to_string()), "{e}");
}

/// Replaces the first occurrence of `from` in `bytes` by `to`.
fn replace(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let at = bytes.windows(from.len()).position(|w| w == from).expect("pattern present");
    [&bytes[..at], to, &bytes[at + from.len()..]].concat()
}

#[test]
fn fields_and_ops_are_stored_by_name() {
    let body = save(&compiled_program())[HEADER_BYTES..].to_vec();
    let unknown_field = wrap(&replace(&body, b"\x06\0\0\0\0\0\0\0source", b"\x06\0\0\0\0\0\0\0sourcf"));
    assert_eq!(
        err(&unknown_field),
        "model.kiln: the program does not parse: field `sourcf` is unknown to this kiln (a newer kiln wrote it?)"
    );
    let unknown_op = wrap(&replace(&body, b"MatMul", b"MatMux"));
    assert!(err(&unknown_op).contains("unknown variant `MatMux`, expected one of"), "{}", err(&unknown_op));

    // A file from before `Program::source` existed: the field is absent and takes its default.
    let field = [&6u64.to_le_bytes()[..], b"source", &5u64.to_le_bytes(), b"tiny/"].concat();
    let mut old = replace(&body, &field, b"");
    let fields = u64::from_le_bytes(old[..8].try_into().unwrap());
    old[..8].copy_from_slice(&(fields - 1).to_le_bytes());
    let p = load(&wrap(&old), "old.kiln").unwrap();
    assert_eq!(p.source, "");
    assert_eq!(p.entries, compiled_program().entries);
}

/// A program without weight sets is written as version 2 (older kilns read it); one with sets
/// as version 3; a version-2 header over a body with sets is refused, and so is a version-3
/// header over a body without (the version lies outside the checksum).
#[test]
fn weight_sets_need_format_version_3() {
    let mut p = compiled_program();
    let mut plain = save(&p);
    assert_eq!(plain[8..12], 2u32.to_le_bytes());
    plain[8..12].copy_from_slice(&3u32.to_le_bytes());
    assert!(err(&plain).contains("holds nothing version 2 cannot"), "{}", err(&plain));
    p.weight_sets = vec![kiln_graph::program::WeightSet { prefix: "m0/".into(), path: "models/a".into() }];
    let bytes = save(&p);
    assert_eq!(bytes[8..12], 3u32.to_le_bytes());
    assert_eq!(load(&bytes, "ens.kiln").unwrap(), p);
    let mut old = bytes.clone();
    old[8..12].copy_from_slice(&2u32.to_le_bytes());
    assert!(err(&old).contains("format version 2 cannot hold weight sets"), "{}", err(&old));
}

/// A program with a `sample_token` step (a generation program that chooses its tokens) is
/// format version 4 and round-trips; a version-3 header over it is refused by name.
#[test]
fn sample_token_needs_format_version_4() {
    let mut g = Graph::new();
    let x = g.input("logits", DType::F32, &[2, 8]).unwrap();
    let o = g.input("sampling", DType::F32, &[2]).unwrap();
    let c = g.input("sampling_counters", DType::I64, &[4]).unwrap();
    let s = g.constant(DType::I64, &[2], vec![0.0, 1.0]).unwrap();
    let ids = g.push(Op::SampleToken, &[x, o, c, s]).unwrap();
    g.output("ids", ids);
    let mut p = compiled_program();
    let namer = |op: &Op, _: &[TensorType], _: &TensorType| format!("cpu.{}", op.name());
    let (e, _, _) = compile_entry(&g, "decode", &mut p, &namer).unwrap();
    p.entries.push(e);
    let bytes = save(&p);
    assert_eq!(bytes[8..12], 4u32.to_le_bytes());
    assert_eq!(load(&bytes, "gen.kiln").unwrap(), p);
    let mut old = bytes.clone();
    old[8..12].copy_from_slice(&3u32.to_le_bytes());
    assert!(err(&old).contains("format version 3 cannot hold sample_token steps"), "{}", err(&old));
}

/// A program with tuning entries is written as version 5 and reads back equal; a version-4
/// header over it is refused by name.
#[test]
fn tuning_entries_need_format_version_5() {
    let mut p = compiled_program();
    p.tuning = vec![kiln_graph::tuning::TuningEntry {
        card: "NVIDIA H200".into(),
        kernel: "gemm".into(),
        shape: "1x2304x2048 BF16 tb".into(),
        choice: "gemv".into(),
        us: Some(4.5),
    }];
    let bytes = save(&p);
    assert_eq!(bytes[8..12], 5u32.to_le_bytes());
    assert_eq!(load(&bytes, "tuned.kiln").unwrap(), p);
    let mut old = bytes.clone();
    old[8..12].copy_from_slice(&4u32.to_le_bytes());
    assert!(err(&old).contains("format version 4 cannot hold tuning entries"), "{}", err(&old));
}

/// A program whose fused region holds a cast (an i64 position read as f32, the result in
/// bf16) is written as version 6 and reads back equal; a version-5 header over it is refused.
#[test]
fn casts_in_regions_need_format_version_6() {
    let mut g = Graph::new();
    let pos = g.input("pos", DType::I64, &[1, 4]).unwrap();
    let e = Expr { instrs: vec![Instr::Input(0), Instr::Cast(DType::F32, 0), Instr::Unary(UnaryOp::Cos, 1), Instr::Cast(DType::BF16, 2)] };
    let y = g.push(Op::Fused(e), &[pos]).unwrap();
    g.output("y", y);
    let mut p = compiled_program();
    let namer = |op: &Op, _: &[TensorType], _: &TensorType| format!("cpu.{}", op.name());
    let (e, _, _) = compile_entry(&g, "angles", &mut p, &namer).unwrap();
    p.entries.push(e);
    let bytes = save(&p);
    assert_eq!(bytes[8..12], 6u32.to_le_bytes());
    assert_eq!(load(&bytes, "cast.kiln").unwrap(), p);
    let mut old = bytes.clone();
    old[8..12].copy_from_slice(&5u32.to_le_bytes());
    assert!(err(&old).contains("format version 5 cannot hold casts inside fused regions"), "{}", err(&old));
}
