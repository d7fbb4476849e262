"""NumPy and torch inputs, errors with the CLI's messages, threads, artifacts."""

from __future__ import annotations

import pickle
import threading

import numpy as np
import pytest

import kiln
from conftest import FIXTURES, cli, cli_error, read_st, write_st

SIGLIP = FIXTURES / "siglip" / "vision_map"
GEMMA = FIXTURES / "gemma" / "gemma2_gqa"


@pytest.fixture(scope="module")
def siglip():
    px = read_st(SIGLIP / "inputs.safetensors")["pixel_values"]
    return kiln.load(SIGLIP, batch=px.shape[0]), px


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    path = tmp_path_factory.mktemp("art") / "vision_map.kiln"
    kiln.compile(SIGLIP, batch=2).save(path)
    return path


def test_inputs_and_outputs_describe_the_entry(siglip):
    s, _ = siglip
    assert s.inputs == [kiln.TensorInfo("pixel_values", "f32", (2, 3, 32, 32), False)]
    assert [(o.name, o.shape) for o in s.outputs] == [("last_hidden_state", (2, 16, 48)), ("pooler_output", (2, 48))]
    assert s.entries == ["forward"] and s.backend == "cpu"


def test_torch_inputs_equal_numpy(siglip):
    torch = pytest.importorskip("torch")
    s, px = siglip
    want = s.run({"pixel_values": px})
    t = torch.from_numpy(px.copy())
    for x in [t, t.requires_grad_(False), torch.from_numpy(np.ascontiguousarray(px.transpose(0, 1, 3, 2))).transpose(2, 3)]:
        got = s.run({"pixel_values": x})
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    # bf16 and f16 tensors are cast to the entry's f32 as `kiln run` casts them.
    half = s.run({"pixel_values": t.to(torch.bfloat16)})
    assert np.abs(half["pooler_output"] - want["pooler_output"]).max() < 0.1
    # Gemma's integer inputs as torch int32: converted to i64 as the CLI converts them.
    ins = read_st(GEMMA / "inputs.safetensors")
    g = kiln.load(GEMMA, batch=ins["input_ids"].shape[0], seq_len=ins["input_ids"].shape[1])
    a = g.run(ins)["logits"]
    b = g.run({k: torch.from_numpy(v.astype(np.int32)) for k, v in ins.items()})["logits"]
    np.testing.assert_array_equal(a, b)


def test_views_are_not_copied_when_the_layout_fits(siglip):
    """A run reads the caller's memory: an array changed between runs changes the outputs,
    and a non-contiguous one gives the same result as its contiguous copy."""
    s, px = siglip
    x = px.copy()
    a = s.run({"pixel_values": x})["pooler_output"]
    x *= 0.5
    b = s.run({"pixel_values": x})["pooler_output"]
    assert not np.array_equal(a, b)
    strided = np.zeros((2, 3, 32, 64), np.float32)
    strided[..., ::2] = px
    np.testing.assert_array_equal(s.run({"pixel_values": strided[..., ::2]})["pooler_output"], a)


def check_same_message(tmp_path, artifact, inputs, cls=kiln.InputError):
    s = kiln.load(artifact)
    with pytest.raises(cls) as e:
        s.run(inputs)
    src = tmp_path / "bad.safetensors"
    write_st(src, inputs)
    assert str(e.value) == cli_error("run", artifact, "--inputs", src, "--out", tmp_path / "out.safetensors")
    return str(e.value)


def test_wrong_name_shape_dtype_raise_the_clis_messages(tmp_path, artifact, siglip):
    _, px = siglip
    msg = check_same_message(tmp_path, artifact, {"pixels": px})
    assert "not an input of 'forward'" in msg and "pixel_values f32[2,3,32,32]" in msg
    msg = check_same_message(tmp_path, artifact, {"pixel_values": px[:1]})
    assert msg == "input 'pixel_values': expected f32[2,3,32,32], found f32[1,3,32,32]"
    msg = check_same_message(tmp_path, artifact, {"pixel_values": px.astype(np.int32)})
    assert msg == "input 'pixel_values': expected f32[2,3,32,32], found i32[2,3,32,32]"
    assert issubclass(kiln.InputError, kiln.KilnError)


def test_other_errors(tmp_path, artifact, siglip):
    s, px = siglip
    with pytest.raises(kiln.InputError, match="dtype float64 is not one kiln runs"):
        s.run({"pixel_values": px.astype(np.float64)})
    with pytest.raises(kiln.InputError, match="no entry 'inverse'"):
        s.run({"pixel_values": px}, entry="inverse")
    bad = tmp_path / "bad.kiln"
    bad.write_bytes(b"not an artifact at all")
    with pytest.raises(kiln.ArtifactError):
        kiln.load(bad)
    with pytest.raises(kiln.ModelError):
        kiln.compile(tmp_path)
    with pytest.raises(kiln.KilnError, match="--dtype f64: expected f32 or bf16"):
        kiln.compile(SIGLIP, dtype="f64")
    with pytest.raises(kiln.BackendError, match="compiled for backend cpu"):
        kiln.load(artifact, backend="cube")
    with pytest.raises(kiln.KilnError, match="generation program"):
        s.generate(np.zeros((2, 3), np.int64))


def test_one_session_from_four_threads_equals_sequential(siglip):
    s, px = siglip
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal(px.shape).astype(np.float32) for _ in range(16)]
    want = [s.run({"pixel_values": b})["pooler_output"] for b in batches]
    got: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def work(k):
        try:
            start.wait()
            for i in range(k, len(batches), 4):
                got[i] = s.run({"pixel_values": batches[i]})["pooler_output"]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, w in enumerate(want):
        np.testing.assert_array_equal(got[i], w)


def test_one_session_per_thread(siglip):
    _, px = siglip
    art = kiln.compile(SIGLIP, batch=2)
    sessions = [art.session() for _ in range(2)]
    want = sessions[0].run({"pixel_values": px})["pooler_output"]
    out = [None, None]

    def work(i):
        out[i] = sessions[i].run({"pixel_values": px})["pooler_output"]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for o in out:
        np.testing.assert_array_equal(o, want)


def test_artifact_save_load_and_pickle(tmp_path, siglip):
    s, px = siglip
    art = kiln.compile(SIGLIP, batch=2)
    assert art.entries == ["forward"] and art.backend == "cpu" and art.source == str(SIGLIP)
    again = pickle.loads(pickle.dumps(art))
    assert again.to_bytes() == art.to_bytes()
    art.save(tmp_path / "a.kiln")
    assert (tmp_path / "a.kiln").read_bytes() == art.to_bytes()
    want = s.run({"pixel_values": px})["pooler_output"]
    for sess in [again.session(), kiln.load(tmp_path / "a.kiln"), kiln.load(tmp_path / "a.kiln", weights=SIGLIP / "model.safetensors")]:
        np.testing.assert_array_equal(sess.run({"pixel_values": px})["pooler_output"], want)


def test_cube_backend_on_the_wheel(siglip):
    """The wheel carries the cube backend (CubeCL on wgpu; lavapipe on a machine without a GPU)."""
    s, px = siglip
    want = s.run({"pixel_values": px})["pooler_output"]
    cube = kiln.load(SIGLIP, batch=2, backend="cube")
    assert cube.backend == "cube"
    got = cube.run({"pixel_values": px})["pooler_output"]
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4


def test_ensemble_artifact_runs_like_the_cli(tmp_path):
    """An ensemble artifact (format 3: weight sets from two folders, `kiln compile --ensemble`)
    loads from Python with its member folders relative to `weights`, and gives the CLI's outputs."""
    bv = FIXTURES / "big_vision"
    art = tmp_path / "ens.kiln"
    cli("compile", "--ensemble", "vit_map_learn", "vit_map_learn_scan", "--batch", "2", "-o", art, cwd=bv)
    images = read_st(bv / "vit_map_learn" / "reference.safetensors")["images"][:2]
    write_st(tmp_path / "in.safetensors", {"images": images})
    cli("run", art, "--weights", bv, "--inputs", tmp_path / "in.safetensors", "--out", tmp_path / "out.safetensors")
    want = read_st(tmp_path / "out.safetensors")
    got = kiln.load(art, weights=bv).run({"images": images})
    assert set(want) <= set(got) and "probs" in got
    for name, w in want.items():
        np.testing.assert_array_equal(got[name], w)
    np.testing.assert_allclose(got["probs"].sum(-1), 1.0, rtol=1e-5)
    with pytest.raises(kiln.KilnError, match="vit_map_learn"):
        kiln.load(art, weights=tmp_path)
