#!/usr/bin/env python3
"""Generate tiny SigLIP / PaliGemma reference fixtures with Hugging Face transformers.

Usage (from the repo root):

    /opt/kiln-venv/bin/python scripts/gen_siglip_fixtures.py [--out tests/fixtures/siglip]

Everything is built from configs with random init (no hub access: HF_HUB_OFFLINE=1 is
forced).  Every parameter is overwritten with a seeded draw so that a wrong bias, norm or
gain shows up in the outputs.  Re-running produces byte-identical files (single thread,
fixed seeds, sorted safetensors headers).

Each case folder holds:
  config.json, model.safetensors  -- written by model.save_pretrained(safe_serialization=True)
  inputs.safetensors              -- pixel_values, NCHW float32, uniform in [-1, 1]
  reference.safetensors           -- float32 outputs (see case.json "outputs")
  case.json                       -- how the reference was called
The reference is computed from the model *re-loaded from the written folder* with
from_pretrained(attn_implementation="eager", dtype=float32), eval mode, torch.no_grad().
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import hashlib
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import transformers
from transformers import (
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "tests" / "fixtures" / "siglip"
BATCH = 2

# ---------------------------------------------------------------------------------------
# weight randomisation
# ---------------------------------------------------------------------------------------

LN_STD = 0.25  # LayerNorm weight = 1 + N(0, 0.25^2)
BIAS_STD = 0.2  # every bias ~ N(0, 0.2^2)
EMB_STD = 0.5  # embeddings, position embeddings, MAP probe ~ N(0, 0.5^2)
QK_GAIN = 1.5  # q/k projections get 1.5 / sqrt(fan_in)


def _normal(shape, std, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float32) * std


@torch.no_grad()
def randomize_(model: nn.Module, seed: int) -> None:
    """Overwrite every parameter of `model` with a seeded draw (see module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    done = {}

    def put(name, param, value):
        assert param.shape == value.shape, (name, param.shape, value.shape)
        param.copy_(value.to(param.dtype))
        done[id(param)] = name

    for mname, mod in model.named_modules():
        short = mname.rsplit(".", 1)[-1]
        if isinstance(mod, nn.LayerNorm):
            put(mname + ".weight", mod.weight, 1.0 + _normal(mod.weight.shape, LN_STD, gen))
            put(mname + ".bias", mod.bias, _normal(mod.bias.shape, BIAS_STD, gen))
        elif type(mod).__name__.endswith("RMSNorm"):
            # Gemma RMSNorm stores an offset: effective scale = 1 + weight.
            put(mname + ".weight", mod.weight, _normal(mod.weight.shape, LN_STD, gen))
        elif isinstance(mod, nn.Linear):  # includes MultiheadAttention.out_proj
            if id(mod.weight) in done:  # tied (lm_head <- embed_tokens)
                continue
            fan_in = mod.weight.shape[1]
            gain = QK_GAIN if short in ("q_proj", "k_proj") else 1.0
            put(mname + ".weight", mod.weight, _normal(mod.weight.shape, gain / math.sqrt(fan_in), gen))
            if mod.bias is not None:
                put(mname + ".bias", mod.bias, _normal(mod.bias.shape, BIAS_STD, gen))
        elif isinstance(mod, nn.Conv2d):
            fan_in = mod.weight[0].numel()  # C * kh * kw
            put(mname + ".weight", mod.weight, _normal(mod.weight.shape, 1.0 / math.sqrt(fan_in), gen))
            if mod.bias is not None:
                put(mname + ".bias", mod.bias, _normal(mod.bias.shape, BIAS_STD, gen))
        elif isinstance(mod, nn.Embedding):
            if id(mod.weight) in done:
                continue
            put(mname + ".weight", mod.weight, _normal(mod.weight.shape, EMB_STD, gen))
        elif isinstance(mod, nn.MultiheadAttention):
            d = mod.embed_dim
            w = _normal(mod.in_proj_weight.shape, 1.0 / math.sqrt(d), gen)  # [3D, D], rows q|k|v
            w[: 2 * d] *= QK_GAIN
            put(mname + ".in_proj_weight", mod.in_proj_weight, w)
            put(mname + ".in_proj_bias", mod.in_proj_bias, _normal(mod.in_proj_bias.shape, BIAS_STD, gen))
        if type(mod).__name__ == "SiglipMultiheadAttentionPoolingHead":
            put(mname + ".probe", mod.probe, _normal(mod.probe.shape, EMB_STD, gen))

    # anything left (SiglipModel.logit_scale / logit_bias): N(0, 0.5^2)
    for pname, p in model.named_parameters():
        if id(p) not in done:
            put(pname, p, _normal(p.shape, EMB_STD, gen))
    missing = [n for n, p in model.named_parameters() if id(p) not in done]
    assert not missing, missing


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def pixel_values(seed: int, res: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand((BATCH, 3, res, res), generator=gen, dtype=torch.float32) * 2.0 - 1.0).contiguous()


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_tensors(path: Path, tensors: dict) -> None:
    save_file({k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()}, str(path))


def saved_keys(folder: Path):
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return sorted(f.keys())


def saved_dtypes(folder: Path):
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return sorted({str(f.get_slice(k).get_dtype()) for k in f.keys()})


def common_prefix(keys, marker="embeddings.patch_embedding.weight"):
    hits = [k[: -len(marker)] for k in keys if k.endswith(marker)]
    assert len(hits) == 1, hits
    return hits[0]


def load_eager(cls, folder: Path):
    m = cls.from_pretrained(str(folder), attn_implementation="eager", dtype=torch.float32)
    m.eval()
    return m


def check_same_params(a: nn.Module, b: nn.Module, what: str):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), what
    for k in sa:
        assert torch.equal(sa[k].float(), sb[k].float()), (what, k)


def bicubic_reference(grid: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Plain numpy re-implementation of torch.nn.functional.interpolate(mode='bicubic',
    align_corners=False, antialias=False) for a [C, H, W] array given an output *size*.
    Used only to prove the description in README.md is exact."""
    A = -0.75

    def w_near(t):  # |x| <= 1
        return ((A + 2) * t - (A + 3)) * t * t + 1

    def w_far(t):  # 1 < |x| < 2
        return ((A * t - 5 * A) * t + 8 * A) * t - 4 * A

    def taps(in_size, out_size):
        scale = in_size / out_size
        rows = []
        for o in range(out_size):
            src = (o + 0.5) * scale - 0.5  # NOT clamped to >= 0 for cubic
            i0 = math.floor(src)
            t = src - i0
            ws = [w_far(t + 1), w_near(t), w_near(1 - t), w_far(2 - t)]
            idx = [min(max(i0 + k, 0), in_size - 1) for k in (-1, 0, 1, 2)]  # edge clamp
            rows.append((idx, ws))
        return rows

    c, h, w = grid.shape
    out = np.zeros((c, out_h, out_w), dtype=np.float64)
    ty, tx = taps(h, out_h), taps(w, out_w)
    for oy, (iy, wy) in enumerate(ty):
        for ox, (ix, wx) in enumerate(tx):
            acc = 0.0
            for a in range(4):
                for b in range(4):
                    acc = acc + wy[a] * wx[b] * grid[:, iy[a], ix[b]]
            out[:, oy, ox] = acc
    return out


# ---------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------

VISION_MAP_CFG = dict(
    hidden_size=48,
    num_attention_heads=4,
    intermediate_size=96,
    num_hidden_layers=3,
    image_size=32,
    patch_size=8,
    num_channels=3,
    layer_norm_eps=1e-6,
    hidden_act="gelu_pytorch_tanh",
    vision_use_head=True,
)

VISION_NOHEAD_CFG = dict(
    hidden_size=36,
    num_attention_heads=3,
    intermediate_size=80,
    num_hidden_layers=2,
    image_size=24,
    patch_size=4,
    num_channels=3,
    layer_norm_eps=1e-5,
    hidden_act="gelu",
    vision_use_head=False,
)


def build_vision(cfg: dict, seed: int) -> SiglipVisionModel:
    torch.manual_seed(seed)
    config = SiglipVisionConfig(**cfg)
    model = SiglipVisionModel._from_config(config, attn_implementation="eager", dtype=torch.float32)
    randomize_(model, seed)
    return model.eval()


@torch.no_grad()
def run_vision(model, px, interpolate=False):
    out = model(pixel_values=px, interpolate_pos_encoding=interpolate)
    res = {"last_hidden_state": out.last_hidden_state}
    if out.pooler_output is not None:
        res["pooler_output"] = out.pooler_output
    return res


def finish_case(folder: Path, name: str, px, ref: dict, case: dict, summary: list):
    save_tensors(folder / "inputs.safetensors", {"pixel_values": px})
    save_tensors(folder / "reference.safetensors", ref)
    keys = saved_keys(folder)
    case = dict(case)
    case.update(
        {
            "case": name,
            "batch": int(px.shape[0]),
            "resolution": int(px.shape[-1]),
            "inputs": {"pixel_values": list(px.shape)},
            "outputs": {k: list(v.shape) for k, v in ref.items()},
            "weights_dtype": saved_dtypes(folder),
            "vision_prefix": common_prefix(keys),
            "reference_dtype": "float32",
            "attn_implementation": "eager",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }
    )
    write_json(folder / "case.json", case)
    line = f"{name:18s} px={tuple(px.shape)} prefix={case['vision_prefix']!r} w={case['weights_dtype']}"
    for k, v in ref.items():
        line += f"\n{'':18s}   {k}: {tuple(v.shape)} max|x|={v.abs().max().item():.4f} mean={v.mean().item():+.4f}"
    summary.append(line)


def case_vision_map(out: Path, summary):
    name = "vision_map"
    folder = out / name
    model = build_vision(VISION_MAP_CFG, seed=1001)
    model.save_pretrained(str(folder), safe_serialization=True)
    m = load_eager(SiglipVisionModel, folder)
    check_same_params(model, m, name)
    px = pixel_values(2001, 32)
    ref = run_vision(m, px)
    finish_case(
        folder,
        name,
        px,
        ref,
        {
            "model_class": "SiglipVisionModel",
            "call": "model(pixel_values)",
            "interpolate_pos_encoding": False,
            "seed_weights": 1001,
            "seed_inputs": 2001,
        },
        summary,
    )
    return folder


def case_vision_map_interp(out: Path, src: Path, summary):
    name = "vision_map_interp"
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    for f in ("config.json", "model.safetensors"):
        shutil.copyfile(src / f, folder / f)
    m = load_eager(SiglipVisionModel, folder)
    px = pixel_values(2003, 48)
    ref = run_vision(m, px, interpolate=True)
    # also prove the bicubic description in README.md: numpy re-implementation vs torch
    emb = m.embeddings
    n, d = emb.position_embedding.weight.shape
    s = int(round(n**0.5))
    grid = emb.position_embedding.weight.detach().double().reshape(s, s, d).permute(2, 0, 1).numpy()
    mine = bicubic_reference(grid, 6, 6).transpose(1, 2, 0).reshape(-1, d)
    theirs = emb.interpolate_pos_encoding(torch.zeros(1, 36, d), 48, 48)[0].detach().double().numpy()
    err = float(np.abs(mine - theirs).max())
    assert err < 1e-5, err
    finish_case(
        folder,
        name,
        px,
        ref,
        {
            "model_class": "SiglipVisionModel",
            "call": "model(pixel_values, interpolate_pos_encoding=True)",
            "interpolate_pos_encoding": True,
            "pos_grid": [s, s],
            "pos_grid_resampled": [6, 6],
            "weights_same_as": "vision_map",
            "seed_inputs": 2003,
            "numpy_bicubic_vs_torch_max_abs": err,
        },
        summary,
    )


def case_vision_nohead(out: Path, summary):
    name = "vision_nohead"
    folder = out / name
    model = build_vision(VISION_NOHEAD_CFG, seed=1002)
    model.save_pretrained(str(folder), safe_serialization=True)
    m = load_eager(SiglipVisionModel, folder)
    check_same_params(model, m, name)
    px = pixel_values(2002, 24)
    ref = run_vision(m, px)
    assert "pooler_output" not in ref
    finish_case(
        folder,
        name,
        px,
        ref,
        {
            "model_class": "SiglipVisionModel",
            "call": "model(pixel_values)",
            "interpolate_pos_encoding": False,
            "seed_weights": 1002,
            "seed_inputs": 2002,
        },
        summary,
    )


def case_vision_bf16(out: Path, summary):
    name = "vision_bf16"
    folder = out / name
    model = build_vision(VISION_MAP_CFG, seed=1001)  # same weights as vision_map
    model.to(torch.bfloat16).save_pretrained(str(folder), safe_serialization=True)
    m = load_eager(SiglipVisionModel, folder)  # dtype=float32: bf16 values upcast exactly
    check_same_params(model, m, name)  # model itself is bf16 now; values compared as float
    px = pixel_values(2001, 32)  # same inputs as vision_map
    ref = run_vision(m, px)
    finish_case(
        folder,
        name,
        px,
        ref,
        {
            "model_class": "SiglipVisionModel",
            "call": "model.float()(pixel_values)  # bf16 weights upcast to float32",
            "interpolate_pos_encoding": False,
            "weights_same_as": "vision_map, rounded to bfloat16 (round-to-nearest-even)",
            "seed_weights": 1001,
            "seed_inputs": 2001,
        },
        summary,
    )


def case_siglip_full(out: Path, summary):
    name = "siglip_full"
    folder = out / name
    seed = 1004
    torch.manual_seed(seed)
    config = SiglipConfig(
        text_config=dict(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            pad_token_id=1,
            bos_token_id=2,
            eos_token_id=3,
        ),
        vision_config=dict(
            hidden_size=48,
            num_attention_heads=4,
            intermediate_size=96,
            num_hidden_layers=2,
            image_size=32,
            patch_size=8,
            layer_norm_eps=1e-6,
            hidden_act="gelu_pytorch_tanh",
            vision_use_head=True,
        ),
    )
    model = SiglipModel._from_config(config, attn_implementation="eager", dtype=torch.float32)
    randomize_(model, seed)
    model.eval().save_pretrained(str(folder), safe_serialization=True)
    m = load_eager(SiglipModel, folder)
    check_same_params(model, m, name)
    px = pixel_values(2004, 32)
    ref = run_vision(m.vision_model, px)
    finish_case(
        folder,
        name,
        px,
        ref,
        {
            "model_class": "SiglipModel",
            "call": "model.vision_model(pixel_values)",
            "interpolate_pos_encoding": False,
            "seed_weights": seed,
            "seed_inputs": 2004,
        },
        summary,
    )


def paligemma_config():
    return PaliGemmaConfig(
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=48,
            num_attention_heads=4,
            intermediate_size=96,
            num_hidden_layers=2,
            image_size=32,
            patch_size=8,
            layer_norm_eps=1e-6,
            hidden_act="gelu_pytorch_tanh",
            vision_use_head=False,
        ),
        text_config=dict(
            model_type="gemma",
            vocab_size=300,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            intermediate_size=128,
            max_position_embeddings=64,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=1,
        ),
        image_token_index=299,
        vocab_size=300,
        projection_dim=64,  # must equal text hidden_size (projector output feeds the LM)
        hidden_size=64,
    )


def case_paligemma(out: Path, summary):
    name = "paligemma_tower"
    folder = out / name
    seed = 1005
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration._from_config(
        paligemma_config(), attn_implementation="eager", dtype=torch.float32
    )
    randomize_(model, seed)
    model.eval().save_pretrained(str(folder), safe_serialization=True)
    m = load_eager(PaliGemmaForConditionalGeneration, folder)
    check_same_params(model, m, name)
    px = pixel_values(2005, 32)
    with torch.no_grad():
        tower = m.model.vision_tower(pixel_values=px)
        feats = m.get_image_features(pixel_values=px)
        # get_image_features returns a BaseModelOutputWithPooling whose pooler_output holds
        # the projected features (transformers 5.x); older versions returned a tensor.
        image_features = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        manual = m.model.multi_modal_projector(tower.last_hidden_state)
        assert torch.allclose(image_features, manual, atol=0, rtol=0)
    assert tower.pooler_output is None
    ref = {"last_hidden_state": tower.last_hidden_state, "image_features": image_features}
    finish_case(
        folder,
        name,
        px,
        ref,
        {
            "model_class": "PaliGemmaForConditionalGeneration",
            "call": "model.model.vision_tower(pixel_values).last_hidden_state; "
            "image_features = model.get_image_features(pixel_values).pooler_output "
            "(= multi_modal_projector.linear(last_hidden_state), no extra scaling in this version)",
            "interpolate_pos_encoding": False,
            "projector_prefix": "multi_modal_projector.linear.",
            "seed_weights": seed,
            "seed_inputs": 2005,
        },
        summary,
    )
    return model


def verify_legacy_layouts(out: Path, pali_model):
    """Real hub checkpoints written by transformers 4.x use `vision_model.` (SiglipVisionModel)
    and `vision_tower.vision_model.` (PaliGemma).  Check that transformers 5.x loads those
    renamed layouts into identical parameters; the facts go into README.md."""
    facts = {}
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        # SiglipVisionModel with vision_model. prefix
        src = out / "vision_map"
        dst = td / "vm"
        dst.mkdir()
        shutil.copyfile(src / "config.json", dst / "config.json")
        sd = load_file(str(src / "model.safetensors"))
        save_file({"vision_model." + k: v for k, v in sd.items()}, str(dst / "model.safetensors"), {"format": "pt"})
        check_same_params(load_eager(SiglipVisionModel, src), load_eager(SiglipVisionModel, dst), "legacy vm")
        facts["SiglipVisionModel loads 'vision_model.'-prefixed keys"] = True
        # PaliGemma with vision_tower.vision_model. prefix
        src = out / "paligemma_tower"
        dst = td / "pg"
        dst.mkdir()
        shutil.copyfile(src / "config.json", dst / "config.json")
        sd = load_file(str(src / "model.safetensors"))
        ren = {}
        for k, v in sd.items():
            if k.startswith("vision_tower."):
                k = "vision_tower.vision_model." + k[len("vision_tower.") :]
            ren[k] = v
        save_file(ren, str(dst / "model.safetensors"), {"format": "pt"})
        check_same_params(
            load_eager(PaliGemmaForConditionalGeneration, src),
            load_eager(PaliGemmaForConditionalGeneration, dst),
            "legacy pg",
        )
        facts["PaliGemma loads 'vision_tower.vision_model.'-prefixed keys"] = True
    return facts


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--skip-legacy-check", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cases = ["vision_map", "vision_nohead", "vision_map_interp", "siglip_full", "paligemma_tower", "vision_bf16"]
    for c in cases:  # start clean so stale files never linger
        if (out / c).exists():
            shutil.rmtree(out / c)

    print(f"torch {torch.__version__}  transformers {transformers.__version__}  numpy {np.__version__}")
    summary = []
    vm = case_vision_map(out, summary)
    case_vision_nohead(out, summary)
    case_vision_map_interp(out, vm, summary)
    case_siglip_full(out, summary)
    pali = case_paligemma(out, summary)
    case_vision_bf16(out, summary)
    print("\n".join(summary))

    if not args.skip_legacy_check:
        for k, v in verify_legacy_layouts(out, pali).items():
            print(f"legacy layout check: {k}: {v}")

    print("\nkeys of vision_map/model.safetensors:")
    with safe_open(str(vm / "model.safetensors"), "pt") as f:
        for k in sorted(f.keys()):
            print(f"  {k:55s} {list(f.get_slice(k).get_shape())} {f.get_slice(k).get_dtype()}")

    total = 0
    print("\nfiles:")
    for p in sorted(out.rglob("*")):
        if p.is_file():
            total += p.stat().st_size
            print(f"  {str(p.relative_to(out)):45s} {p.stat().st_size:8d}  {sha(p)}")
    print(f"total {total} bytes")


if __name__ == "__main__":
    sys.exit(main())
