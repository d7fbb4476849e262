#!/usr/bin/env python3
"""Reference outputs of UViM's task heads: big_vision's own `predict_outputs` of
`trainers/proj/uvim/panoptic_task.py` and `colorization_task.py` (and `depth_task.py`) run with
JAX on seeded random VQ-VAE logits, for `tests/golden_uvim.rs`.

Usage (from the repo root; big_vision at commit 0127fb6b337ee2a27bf4e54dea79cff176527356):

    git clone https://github.com/google-research/big_vision /tmp/bv
    python3 -m venv /tmp/jaxvenv && /tmp/jaxvenv/bin/pip install jax==0.10.2 einops==0.8.2 numpy==2.4.6 safetensors==0.8.0
    /tmp/jaxvenv/bin/python scripts/gen_uvim_task_fixtures.py --big-vision /tmp/bv \
        [--out tests/fixtures/uvim_tasks/reference.safetensors]

The task modules import `big_vision.utils` for the training loss only (`u.softmax_xent`);
that module pulls in TensorFlow, so a stand-in without it is registered first. Every function
called below is the official one, unchanged.

Writes, for each case, the logits (`<case>/logits/<name>`, `[B, hn*wn, C, hp*wp]`) and the
official outputs: `<case>/panoptic` (`[B, H, W, 2]` int32: semantic label, instance id; pixels
of instances at or below `min_fraction` zeroed), `<case>/color` (`[B, H, W, 3]`, clipped to
[-1, 1]), `<case>/depth` (`[B, H, W]`).
"""

import argparse
import sys
import types
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--big-vision", type=Path, required=True, help="a big_vision checkout")
    ap.add_argument("--out", type=Path, default=Path("tests/fixtures/uvim_tasks/reference.safetensors"))
    args = ap.parse_args()
    sys.path.insert(0, str(args.big_vision))
    import big_vision  # noqa: F401

    stub = types.ModuleType("big_vision.utils")
    stub.softmax_xent = None  # the losses are not called here
    sys.modules["big_vision.utils"] = stub
    import jax.numpy as jnp
    from big_vision.trainers.proj.uvim import colorization_task, depth_task, panoptic_task

    def config(hw, patch, **extra):
        model = types.SimpleNamespace(input_size=hw, patch_size=patch)
        return types.SimpleNamespace(model=model, **extra)

    rng = np.random.default_rng(0)
    out = {}
    # Panoptic: 2 images of 8x12 pixels in 2x3 patches, 5 semantic classes, 6 instance ids;
    # instance logits made blocky so some instances are large and some tiny.
    hw, patch, b = (8, 12), (2, 3), 2
    n = (hw[0] // patch[0]) * (hw[1] // patch[1])
    pp = patch[0] * patch[1]
    for case, min_fraction in [("panoptic", 0.0), ("panoptic_min", 0.1)]:
        sem = rng.normal(size=(b, n, 5, pp)).astype(np.float32)
        ins = rng.normal(size=(b, n, 6, pp)).astype(np.float32)
        ins[:, : n // 2, 2, :] += 3.0  # instance 2 covers half the image
        ins[:, n - 1, 4, :2] += 5.0  # instance 4: two pixels
        logits = {"semantics": jnp.asarray(sem), "instances": jnp.asarray(ins)}
        pred = panoptic_task.predict_outputs(logits, config(hw, patch), min_fraction=min_fraction)
        out[f"{case}/logits/semantics"] = sem
        out[f"{case}/logits/instances"] = ins
        out[f"{case}/panoptic"] = np.asarray(pred, dtype=np.int32)
        out[f"{case}/min_fraction"] = np.array([min_fraction], dtype=np.float32)
    # Colorization: values beyond [-1, 1] exercise the clip.
    color = (1.5 * rng.normal(size=(b, n, 3, pp))).astype(np.float32)
    pred = colorization_task.predict_outputs({"color": jnp.asarray(color)}, config(hw, patch))
    out["colorization/logits/color"] = color
    out["colorization/color"] = np.asarray(pred["color"], dtype=np.float32)
    # Depth, as kiln's depth task already computes it.
    bins = 7
    depth = rng.normal(size=(b, n, bins, pp)).astype(np.float32)
    cfg = config(hw, patch, min_depth=0.001, max_depth=10.0)
    cfg.model.inputs = types.SimpleNamespace(depth=(bins, pp))
    pred = depth_task.predict_outputs({"depth": jnp.asarray(depth)}, cfg)
    out["depth/logits/depth"] = depth
    out["depth/depth"] = np.asarray(pred["depth"], dtype=np.float32)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(args.out))
    for k, v in sorted(out.items()):
        print(k, v.shape, v.dtype)


if __name__ == "__main__":
    main()
