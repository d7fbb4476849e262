#!/usr/bin/env python3
"""PyTorch peer benchmark for a SigLIP vision tower stored as a Hugging Face folder.

    /opt/kiln-venv/bin/python scripts/bench_torch_siglip.py MODEL_DIR \
        [--batch 1] [--runs 10] [--threads 2] [--resolution R] \
        [--write-inputs px.safetensors] [--write-outputs out.safetensors]

MODEL_DIR holds config.json + *.safetensors of a SiglipVisionModel, a SiglipModel (its
vision half is benchmarked) or a PaliGemmaForConditionalGeneration (its vision tower is
benchmarked; only that part is loaded into the timed module).  The model is loaded in
float32 on CPU with transformers' default attention (SDPA).  Random pixel_values (uniform
in [-1, 1], seeded) are made, one warm-up call is done, then --runs timed calls of
model(pixel_values) under torch.inference_mode().  One JSON line is printed on stdout:

    {"peer": "pytorch", "torch": ..., "min_ms": ..., "median_ms": ..., "max_ms": ...,
     "runs": N, "batch": N, "threads": N, ...}

--write-inputs saves the pixel_values used (tensor `pixel_values`); --write-outputs saves
`last_hidden_state` (and `pooler_output` when the model has a MAP head) from the warm-up
call, so another engine can be checked against exactly this run.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", help="HF folder: config.json + model.safetensors")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--resolution", type=int, default=None, help="square input size; default config image_size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write-inputs", default=None, metavar="PATH.safetensors")
    ap.add_argument("--write-outputs", default=None, metavar="PATH.safetensors")
    args = ap.parse_args()
    if args.batch < 1 or args.runs < 1 or args.threads < 1:
        ap.error("--batch, --runs and --threads must be >= 1")
    return args


def load_vision(model_dir: Path):
    """Return (vision_module, vision_config, kind) in float32 eval mode on CPU."""
    import torch
    from transformers import AutoConfig, SiglipVisionModel

    cfg = AutoConfig.from_pretrained(str(model_dir))
    mt = cfg.model_type
    if mt == "siglip_vision_model":
        m = SiglipVisionModel.from_pretrained(str(model_dir), dtype=torch.float32)
        return m.eval(), m.config, "SiglipVisionModel"
    if mt == "siglip":
        from transformers import SiglipModel

        m = SiglipModel.from_pretrained(str(model_dir), dtype=torch.float32)
        return m.vision_model.eval(), m.config.vision_config, "SiglipModel.vision_model"
    if mt == "paligemma":
        from transformers import PaliGemmaForConditionalGeneration

        m = PaliGemmaForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32)
        tower = m.model.vision_tower
        return tower.eval(), m.config.vision_config, "PaliGemma.vision_tower"
    raise SystemExit(f"unsupported model_type {mt!r} in {model_dir}/config.json")


def main():
    args = parse_args()
    import torch
    from safetensors.torch import save_file
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)

    model, vcfg, kind = load_vision(Path(args.model_dir))
    res = args.resolution or vcfg.image_size
    interpolate = res != vcfg.image_size
    gen = torch.Generator().manual_seed(args.seed)
    px = torch.rand((args.batch, vcfg.num_channels, res, res), generator=gen, dtype=torch.float32) * 2.0 - 1.0

    if args.write_inputs:
        save_file({"pixel_values": px.contiguous()}, args.write_inputs)

    times = []
    with torch.inference_mode():
        out = model(pixel_values=px, interpolate_pos_encoding=interpolate)  # warm-up
        if args.write_outputs:
            tensors = {"last_hidden_state": out.last_hidden_state.float().contiguous()}
            if out.pooler_output is not None:
                tensors["pooler_output"] = out.pooler_output.float().contiguous()
            save_file(tensors, args.write_outputs)
        for _ in range(args.runs):
            t0 = time.perf_counter()
            model(pixel_values=px, interpolate_pos_encoding=interpolate)
            times.append((time.perf_counter() - t0) * 1e3)

    print(
        json.dumps(
            {
                "peer": "pytorch",
                "torch": torch.__version__,
                "min_ms": round(min(times), 4),
                "median_ms": round(statistics.median(times), 4),
                "max_ms": round(max(times), 4),
                "runs": args.runs,
                "batch": args.batch,
                "threads": args.threads,
                "resolution": res,
                "interpolate_pos_encoding": interpolate,
                "model": kind,
                "attn_implementation": getattr(vcfg, "_attn_implementation", None),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
