#!/usr/bin/env python3
"""Generate tiny Gemma / Gemma 2 reference fixtures with Hugging Face transformers.

Usage (from the repo root):

    /opt/kiln-venv/bin/python scripts/gen_gemma_fixtures.py [--out tests/fixtures/gemma]

Every model is built from a config with every parameter overwritten by a seeded draw (the
RMSNorm offsets included, so `1 + w` is checked), saved with save_pretrained, re-loaded with
attn_implementation="eager" in float32, and run under torch.no_grad() on one thread.

Each case folder holds:
  config.json, generation_config.json, model.safetensors  -- save_pretrained
  inputs.safetensors     -- input_ids [2, S] (int64), attention_mask [2, S] (int64, row 1
                            left-padded), position_ids [2, S] as generate() computes them
                            (cumsum(mask) - 1, 1 where the mask is 0)
  reference.safetensors  -- logits [2, S, V] of forward(input_ids, attention_mask, position_ids)
                            (float32); sequences [2, S + N] (int64) and step_logits [2, N, V]
                            (float32) of generate(do_sample=False, max_new_tokens=N) on the
                            same batch: prompt + new tokens, pad_token_id after a row's EOS
  case.json              -- how the reference was called
  beam_reference.safetensors -- beam search on the generation batch (inputs.safetensors, or
                            PaliGemma's generate_inputs.safetensors): for each setting in
                            BEAMS, `{name}/sequences` [2 * R, S + n] and `{name}/sequences_scores`
                            [2 * R] of generate(num_beams=4, num_return_sequences=R, ...);
                            `--beams-only` rewrites just these files from the saved folders
The EOS id of each case is a token that row 0 produces early on its own, so per-row stopping
is exercised; the softcaps are small enough to saturate and the sliding window is shorter than
the sequence.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import argparse
import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GemmaConfig,
    GemmaForCausalLM,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
)
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "tests" / "fixtures" / "gemma"
SEQ = 20
PAD = 5  # left padding of row 1
NEW = 6  # tokens generated


def _normal(shape, std, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float32) * std


@torch.no_grad()
def randomize_(model: nn.Module, seed: int) -> None:
    """Overwrite every parameter with a seeded draw."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if "vision_tower" in name and ("layer_norm" in name or "post_layernorm" in name):
            v = (1.0 if name.endswith("weight") else 0.0) + _normal(p.shape, 0.25, gen)  # LayerNorm
        elif name.endswith("norm.weight") or "layernorm" in name:
            v = _normal(p.shape, 0.25, gen)  # Gemma stores the offset: scale = 1 + w
        elif p.dim() == 1:
            v = _normal(p.shape, 0.2, gen)  # biases
        elif "patch_embedding" in name:
            v = _normal(p.shape, 1.0 / math.sqrt(p[0].numel()), gen)
        elif "position_embedding" in name:
            v = _normal(p.shape, 0.5, gen)
        elif "embed_tokens" in name:
            v = _normal(p.shape, 0.15, gen)
        else:
            fan_in = p.shape[1]
            gain = 2.0 if ("q_proj" in name or "k_proj" in name) else 4.0 if ("o_proj" in name or "down_proj" in name) else 1.0
            v = _normal(p.shape, gain / math.sqrt(fan_in), gen)
        p.copy_(v)


def position_ids_of(mask: torch.Tensor) -> torch.Tensor:
    """What generate() computes for the prompt."""
    pos = mask.long().cumsum(-1) - 1
    pos.masked_fill_(mask == 0, 1)
    return pos


def save_tensors(path: Path, tensors: dict) -> None:
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path))


def make_case(out: Path, name: str, cls, cfg, seed: int, summary: list) -> None:
    torch.manual_seed(seed)
    model = cls(cfg)
    randomize_(model, seed)
    folder = out / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    model = cls.from_pretrained(str(folder), attn_implementation="eager", dtype=torch.float32).eval()

    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(3, cfg.vocab_size, (2, SEQ), generator=gen, dtype=torch.int64)
    mask = torch.ones(2, SEQ, dtype=torch.int64)
    mask[1, :PAD] = 0
    ids[1, :PAD] = cfg.pad_token_id
    pos = position_ids_of(mask)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
        # Pick an EOS that row 0 emits at its third new token, so its row stops early.
        probe = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=cfg.pad_token_id)
        eos = int(probe[0, SEQ + 2])
        model.generation_config.eos_token_id = eos
        model.generation_config.pad_token_id = cfg.pad_token_id
        model.generation_config.bos_token_id = cfg.bos_token_id
        g = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=NEW,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    model.generation_config.save_pretrained(str(folder))
    steps = torch.stack([x.float() for x in g.logits], dim=1)  # [B, N, V]
    save_tensors(folder / "inputs.safetensors", {"input_ids": ids, "attention_mask": mask, "position_ids": pos})
    save_tensors(folder / "reference.safetensors", {"logits": logits, "sequences": g.sequences, "step_logits": steps})
    case = {"class": cls.__name__, "seq": SEQ, "left_pad_row1": PAD, "max_new_tokens": NEW, "eos_token_id": eos,
            "generated": g.sequences[:, SEQ:].tolist()}
    (folder / "case.json").write_text(json.dumps(case, indent=2, sort_keys=True) + "\n")
    summary.extend(write_beam_reference(folder))
    cap = getattr(cfg, "final_logit_softcapping", None)
    sat = "" if not cap else f", final softcap saturation {(logits.abs() > 0.5 * cap).float().mean():.2f}"
    summary.append(f"{name}: logits {list(logits.shape)} max {logits.abs().max():.2f}{sat}, generated {g.sequences[:, SEQ:].tolist()}")


# Beam settings: (name, generate() keywords). "fixed" never stops early (EOS masked until the
# last token); "eos" lets rows finish at EOS, stops when 4 hypotheses are done, and divides by
# length ** 0.5.
BEAMS = [
    ("fixed", dict(num_beams=4, num_return_sequences=2, min_new_tokens=NEW, max_new_tokens=NEW)),
    ("eos", dict(num_beams=4, num_return_sequences=3, max_new_tokens=NEW, early_stopping=True, length_penalty=0.5)),
]


@torch.no_grad()
def write_beam_reference(folder: Path) -> list:
    """Runs transformers' beam search on a saved case folder and writes beam_reference.safetensors."""
    case = json.loads((folder / "case.json").read_text())
    pali = case["class"] == "PaliGemmaForConditionalGeneration"
    cls = {"GemmaForCausalLM": GemmaForCausalLM, "Gemma2ForCausalLM": Gemma2ForCausalLM,
           "PaliGemmaForConditionalGeneration": PaliGemmaForConditionalGeneration}[case["class"]]
    model = cls.from_pretrained(str(folder), attn_implementation="eager", dtype=torch.float32).eval()
    from safetensors.torch import load_file
    ins = load_file(str(folder / ("generate_inputs.safetensors" if pali else "inputs.safetensors")))
    kw = dict(input_ids=ins["input_ids"], attention_mask=ins["attention_mask"])
    if pali:
        kw.update(pixel_values=ins["pixel_values"], token_type_ids=torch.zeros_like(ins["input_ids"]))
    out, lines = {}, []
    for name, opts in BEAMS:
        g = model.generate(**kw, do_sample=False, output_scores=True, return_dict_in_generate=True, **opts)
        out[f"{name}/sequences"] = g.sequences
        out[f"{name}/sequences_scores"] = g.sequences_scores.float()
        lines.append(f"{folder.name} beams {name}: {g.sequences[:, ins['input_ids'].shape[1]:].tolist()} "
                     f"scores {[round(x, 5) for x in g.sequences_scores.tolist()]}")
    save_tensors(folder / "beam_reference.safetensors", out)
    return lines


def gemma_mqa():
    return GemmaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=1, head_dim=32, hidden_act="gelu_pytorch_tanh", rms_norm_eps=1e-6,
                       rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}, pad_token_id=0, bos_token_id=2,
                       eos_token_id=1, max_position_embeddings=128)


def gemma2_gqa():
    return Gemma2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24, sliding_window=6,
                        attn_logit_softcapping=2.0, final_logit_softcapping=2.5,
                        rope_parameters={"rope_theta": 500.0, "rope_type": "default"}, pad_token_id=0, bos_token_id=2,
                        eos_token_id=1, max_position_embeddings=128)


def gemma2_untied():
    return Gemma2Config(vocab_size=260, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=2,
                        num_key_value_heads=2, head_dim=40, query_pre_attn_scalar=40, sliding_window=9,
                        layer_types=["full_attention", "sliding_attention", "sliding_attention"],
                        attn_logit_softcapping=3.0, final_logit_softcapping=None, tie_word_embeddings=False,
                        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}, pad_token_id=0, bos_token_id=2,
                        eos_token_id=1, max_position_embeddings=128)


IMG = 16  # image tokens: 32 px, patch 8
PALI_SUFFIX = 4


def pali_config(text: dict) -> PaliGemmaConfig:
    return PaliGemmaConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, num_attention_heads=2, intermediate_size=64,
                           num_hidden_layers=2, image_size=32, patch_size=8, hidden_act="gelu_pytorch_tanh",
                           vision_use_head=False),
        text_config=dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, head_dim=16,
                         intermediate_size=96, max_position_embeddings=128, pad_token_id=0, bos_token_id=2, eos_token_id=1,
                         **text),
        image_token_index=299, vocab_size=300, projection_dim=64, hidden_size=64,
    )


def make_pali_case(out: Path, name: str, cfg, seed: int, summary: list) -> None:
    """A left-padded batch [pad] [image x16] [bos, prompt, sep] (prefix) [suffix]; forward
    logits with token_type_ids (prefix-LM mask), and generation from the prefix."""
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(cfg)
    randomize_(model, seed)
    folder = out / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    model = PaliGemmaForConditionalGeneration.from_pretrained(str(folder), attn_implementation="eager", dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    prompt = [7, 4]  # text tokens per row (row 1 gets 3 more pads)
    rows, pre = [], []
    width = IMG + 1 + max(prompt) + 1
    for r, n in enumerate([7, 4]):
        text = torch.randint(3, 290, (n,), generator=gen).tolist()
        row = [299] * IMG + [2] + text + [10]  # 10 stands for the "\n" separator
        pre.append([0] * (width - len(row)) + row)
    prefix = torch.tensor(pre, dtype=torch.int64)
    pmask = (torch.arange(width)[None, :] >= torch.tensor([[width - IMG - 2 - n] for n in prompt])).long()
    suffix = torch.randint(3, 290, (2, PALI_SUFFIX), generator=gen)
    ids = torch.cat([prefix, suffix], 1)
    mask = torch.cat([pmask, torch.ones(2, PALI_SUFFIX, dtype=torch.int64)], 1)
    tt = torch.cat([torch.zeros_like(prefix), torch.ones(2, PALI_SUFFIX, dtype=torch.int64)], 1)
    pos = position_ids_of(mask) + 1  # PaliGemma positions are 1-indexed
    px = torch.rand((2, 3, 32, 32), generator=gen) * 2 - 1
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, token_type_ids=tt, pixel_values=px).logits.float()
        probe = model.generate(input_ids=prefix, attention_mask=pmask, pixel_values=px, token_type_ids=torch.zeros_like(prefix),
                               max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
        eos = int(probe[0, width + 2])
        model.generation_config.eos_token_id = eos
        model.generation_config.pad_token_id = 0
        g = model.generate(input_ids=prefix, attention_mask=pmask, pixel_values=px, token_type_ids=torch.zeros_like(prefix),
                           max_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True)
    model.generation_config.save_pretrained(str(folder))
    steps = torch.stack([x.float() for x in g.logits], dim=1)
    save_tensors(folder / "inputs.safetensors", {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
                                                 "token_type_ids": tt, "pixel_values": px})
    save_tensors(folder / "generate_inputs.safetensors", {"input_ids": prefix, "attention_mask": pmask, "pixel_values": px})
    save_tensors(folder / "reference.safetensors", {"logits": logits, "sequences": g.sequences, "step_logits": steps})
    case = {"class": "PaliGemmaForConditionalGeneration", "image_tokens": IMG, "prefix": width, "suffix": PALI_SUFFIX,
            "eos_token_id": eos, "generated": g.sequences[:, width:].tolist(),
            "generate": "generate(prefix ids, attention_mask, pixel_values, token_type_ids=zeros, do_sample=False)"}
    (folder / "case.json").write_text(json.dumps(case, indent=2, sort_keys=True) + "\n")
    summary.extend(write_beam_reference(folder))
    summary.append(f"{name}: logits {list(logits.shape)}, generated {g.sequences[:, width:].tolist()}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--beams-only", action="store_true", help="only rewrite beam_reference.safetensors of the saved cases")
    args = ap.parse_args()
    summary = []
    if args.beams_only:
        for name in ["gemma_mqa", "gemma2_gqa", "gemma2_untied", "paligemma", "paligemma2"]:
            summary.extend(write_beam_reference(args.out / name))
        print("\n".join(summary))
        return
    make_case(args.out, "gemma_mqa", GemmaForCausalLM, gemma_mqa(), 11, summary)
    make_case(args.out, "gemma2_gqa", Gemma2ForCausalLM, gemma2_gqa(), 12, summary)
    make_case(args.out, "gemma2_untied", Gemma2ForCausalLM, gemma2_untied(), 13, summary)
    make_pali_case(args.out, "paligemma", pali_config(dict(model_type="gemma", num_key_value_heads=1)), 14, summary)
    make_pali_case(args.out, "paligemma2", pali_config(dict(model_type="gemma2", num_key_value_heads=2, sliding_window=6,
                                                           query_pre_attn_scalar=20, attn_logit_softcapping=2.0,
                                                           final_logit_softcapping=2.5)), 15, summary)
    print("\n".join(summary))


if __name__ == "__main__":
    main()
