"""The package's outputs against the CLI's (the same program, so bit for bit) and against the
reference implementations' committed outputs (within the Rust golden tests' bound, 1e-4), on
the shipped SigLIP, Gemma 2, PaliGemma and big_vision fixtures."""

from __future__ import annotations

import json

import numpy as np
import pytest

import kiln
from conftest import FIXTURES, cli, read_st, rel_err

SIGLIP = ["vision_map", "vision_nohead", "vision_map_interp", "siglip_full", "paligemma_tower", "vision_bf16"]
GEMMA = ["gemma_mqa", "gemma2_gqa", "gemma2_untied"]
PALI = ["paligemma", "paligemma2"]
# (folder, the folder whose reference it matches): the scan layout holds the same parameters.
BIG_VISION = [("vit_map_learn", "vit_map_learn"), ("vit_map_learn_scan", "vit_map_learn"), ("vit_tok_sincos2d", "vit_tok_sincos2d")]


def cli_outputs(tmp_path, folder, inputs: dict[str, np.ndarray], *extra: str) -> dict[str, np.ndarray]:
    from conftest import write_st

    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    write_st(src, inputs)
    cli("run", folder, "--inputs", src, "--out", out, *extra)
    return read_st(out)


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.mark.parametrize("case", SIGLIP)
def test_siglip_equals_cli_and_transformers(tmp_path, case):
    d = FIXTURES / "siglip" / case
    px = read_st(d / "inputs.safetensors")["pixel_values"]
    s = kiln.load(d, batch=px.shape[0], resolution=px.shape[2])
    got = s.run({"pixel_values": px})
    assert_same(got, cli_outputs(tmp_path, d, {"pixel_values": px}))
    ref = read_st(d / "reference.safetensors")
    assert rel_err(got["last_hidden_state"], ref["last_hidden_state"]) < 1e-4


def valid_rows(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return x[mask.astype(bool)]


@pytest.mark.parametrize("case", GEMMA + PALI)
def test_gemma_forward_equals_cli_and_transformers(tmp_path, case):
    d = FIXTURES / "gemma" / case
    ins = read_st(d / "inputs.safetensors")
    b, l = ins["input_ids"].shape
    got = kiln.load(d, batch=b, seq_len=l, resolution=ins["pixel_values"].shape[2] if "pixel_values" in ins else None).run(ins)
    assert_same(got, cli_outputs(tmp_path, d, ins))
    ref = read_st(d / "reference.safetensors")
    m = ins["attention_mask"]
    assert rel_err(valid_rows(got["logits"], m), valid_rows(ref["logits"], m)) < 1e-4


@pytest.mark.parametrize("case", GEMMA)
def test_gemma_generate_equals_cli_and_transformers(tmp_path, case):
    from conftest import write_st

    d = FIXTURES / "gemma" / case
    ins = read_st(d / "inputs.safetensors")
    b, l = ins["input_ids"].shape
    s = kiln.load(d, generate=True, batch=b, seq_len=l + 3, max_new_tokens=6)
    got = s.generate(ins["input_ids"], ins["attention_mask"], max_new_tokens=6)
    ref = read_st(d / "reference.safetensors")
    np.testing.assert_array_equal(got["sequences"], ref["sequences"])
    assert rel_err(got["step_logits"], ref["step_logits"]) < 1e-4
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    write_st(src, {"input_ids": ins["input_ids"], "attention_mask": ins["attention_mask"]})
    # The CLI writes the step logits only when asked (its last kernel chooses the tokens).
    cli("generate", d, "--inputs", src, "--out", out, "--max-new-tokens", "6", "--bucket", str(l + 3), "--step-logits")
    assert_same(got, read_st(out))


@pytest.mark.parametrize("case", PALI)
def test_paligemma_generate_from_image_equals_transformers(case, tmp_path):
    d = FIXTURES / "gemma" / case
    ins = read_st(d / "generate_inputs.safetensors")
    b, l = ins["input_ids"].shape
    art = kiln.compile(d, generate=True, batch=b, seq_len=l + 2, max_new_tokens=6)
    art.save(tmp_path / "gen.kiln")
    s = kiln.load(tmp_path / "gen.kiln")
    got = s.generate(ins["input_ids"], ins["attention_mask"], ins["pixel_values"])
    ref = read_st(d / "reference.safetensors")
    np.testing.assert_array_equal(got["sequences"], ref["sequences"])
    assert rel_err(got["step_logits"], ref["step_logits"]) < 1e-4


def test_paligemma_prompt_and_image_equal_cli():
    cases = json.loads((FIXTURES / "tokenizer" / "generate_cases.json").read_text())
    d = FIXTURES / "tokenizer" / "paligemma"
    s = kiln.load(d, generate=True, seq_len=24, max_new_tokens=10)
    for c in cases["paligemma"]:
        img = FIXTURES / "tokenizer" / c["image"]
        got = s.generate(prompt=c["prompt"], image=img, max_new_tokens=c["max_new_tokens"])
        assert got["new_ids"] == c["new_ids"], c["prompt"]
        assert got["text"] == c["text"], c["prompt"]
        r = cli("generate", d, "--prompt", c["prompt"], "--image", img, "--max-new-tokens", str(c["max_new_tokens"]))
        assert r.stdout.split("\n")[0] == got["text"]
        assert all(len(det[1]) == 4 and len(det[2]) == 4 for det in got["detections"])


@pytest.mark.parametrize("case,ref_case", BIG_VISION)
def test_big_vision_equals_cli_and_official(tmp_path, case, ref_case):
    d = FIXTURES / "big_vision" / case
    ref = read_st(FIXTURES / "big_vision" / ref_case / "reference.safetensors")
    images = ref["images"]
    got = kiln.load(d, batch=images.shape[0], resolution=images.shape[1]).run({"images": images})
    want = cli_outputs(tmp_path, d, {"images": images})
    assert_same(got, want)
    assert rel_err(got["logits"], ref["logits"]) < 1e-4


@pytest.mark.parametrize("case", ["gemma2_gqa", "paligemma2"])
def test_beam_search_and_samples_equal_transformers(case):
    """Beam search (4 beams, 2 returned, EOS masked to the last token) equals transformers'
    generate (beam_reference.safetensors); a program with 3 rows per input gives transformers'
    greedy ids on every row, and logprobs that are the step logits' log-softmax."""
    d = FIXTURES / "gemma" / case
    pali = (d / "generate_inputs.safetensors").exists()
    ins = read_st(d / ("generate_inputs.safetensors" if pali else "inputs.safetensors"))
    b, l = ins["input_ids"].shape
    args = (ins["input_ids"], ins["attention_mask"], ins["pixel_values"] if pali else None)
    s = kiln.load(d, generate=True, batch=b, seq_len=l + 1, max_new_tokens=6, rows_per_input=4)
    got = s.generate(*args, max_new_tokens=6, num_beams=4, num_return_sequences=2, min_new_tokens=6)
    ref = read_st(d / "beam_reference.safetensors")
    np.testing.assert_array_equal(got["sequences"], ref["fixed/sequences"])
    np.testing.assert_allclose(got["sequences_scores"], ref["fixed/sequences_scores"], atol=1e-4, rtol=0)
    s3 = kiln.load(d, generate=True, batch=b, seq_len=l + 1, max_new_tokens=6, rows_per_input=3)
    greedy = s3.generate(*args, max_new_tokens=6)
    want = read_st(d / "reference.safetensors")["sequences"]
    np.testing.assert_array_equal(greedy["sequences"], np.repeat(want, 3, axis=0))
    z = greedy["step_logits"].astype(np.float64)
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    chosen = np.take_along_axis(z, greedy["sequences"][:, l:, None], -1)[..., 0] - lse
    eos = np.isin(greedy["sequences"][:, l:], json.loads((d / "generation_config.json").read_text())["eos_token_id"])
    after = np.cumsum(eos, 1) - eos > 0  # steps after a row's EOS hold the pad id (logprob 0)
    np.testing.assert_allclose(greedy["logprobs"], np.where(after, 0.0, chosen), atol=1e-5)
    with pytest.raises(kiln.KilnError, match="no temperature"):
        s.generate(*args, num_beams=4, temperature=1.0)
