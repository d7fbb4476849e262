#!/usr/bin/env python3
"""Pillow's `Image.resize` on random 8-bit images, for tests/tokenizer_images.rs
(`resize_matches_pillow_every_shape`): writes tests/fixtures/tokenizer/resize_cases.safetensors.

Each case `<i>/in` is a random uint8 image (H, W, C), `<i>/out` what Pillow's resize makes of
it, and `<i>/spec` is int64 [out_w, out_h, filter code]. The shapes cover both pass orders of
Pillow 13 (vertical first when the height shrinks by more than twice as many pixels as the
width: `h - oh > 2 (w - ow)`), up- and downscaling on each axis, one-axis resizes, grey and RGB,
and all five filters that take the two-pass path.

Before writing, the script checks that rule against Pillow itself on 2000 random shapes,
re-implementing `Resample.c`'s fixed-point passes in numpy, so that a Pillow whose rule
differs is caught here rather than as a failing Rust test.

Run with the venv that made the other fixtures: /opt/kiln-venv/bin/python scripts/gen_resize_fixtures.py
"""
import math
import pathlib

import numpy as np
import PIL
import torch
from PIL import Image
from safetensors.torch import save_file

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/tokenizer/resize_cases.safetensors"
PRECISION_BITS = 22


def bicubic(x):
    a = -0.5
    x = abs(x)
    if x < 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def coeffs(in_size, out_size):
    scale = in_size / out_size
    fs = max(scale, 1.0)
    support = 2.0 * fs
    out = []
    for xx in range(out_size):
        c = (xx + 0.5) * scale
        xmin = max(int(c - support + 0.5), 0)
        n = min(int(c + support + 0.5), in_size) - xmin
        w = [bicubic((x + xmin - c + 0.5) / fs) for x in range(n)]
        s = sum(w)
        w = [v / s for v in w] if s != 0 else w
        k = [int(-0.5 + v * (1 << PRECISION_BITS)) if v < 0 else int(0.5 + v * (1 << PRECISION_BITS)) for v in w]
        out.append((xmin, k))
    return out


def one_pass(img, out_size, axis):
    """Resample.c's 8-bit pass along `axis` (0 rows, 1 columns), rounding to uint8."""
    img = np.moveaxis(img.astype(np.int64), axis, 0)
    out = np.zeros((out_size,) + img.shape[1:], np.int64)
    for i, (lo, k) in enumerate(coeffs(img.shape[0], out_size)):
        ss = np.full(img.shape[1:], 1 << (PRECISION_BITS - 1), np.int64)
        for j, kv in enumerate(k):
            ss += img[lo + j] * kv
        out[i] = np.clip(ss >> PRECISION_BITS, 0, 255)
    return np.moveaxis(out, 0, axis)


def check_rule(rng, n=2000):
    """Which pass Pillow runs first, on random bicubic downscales and upscales."""
    seen = {"vertical": 0, "horizontal": 0}
    for _ in range(n):
        w, h, ow, oh = (int(v) for v in rng.integers(3, 120, 4))
        if w == ow or h == oh:
            continue
        a = rng.integers(0, 256, (h, w), dtype=np.uint8)
        got = np.asarray(Image.fromarray(a).resize((ow, oh), Image.Resampling.BICUBIC)).astype(np.int64)
        hv = one_pass(one_pass(a, ow, 1), oh, 0)
        vh = one_pass(one_pass(a, oh, 0), ow, 1)
        vertical_first = h - oh > 0 and h - oh > 2 * (w - ow)
        want = vh if vertical_first else hv
        other = hv if vertical_first else vh
        if not np.array_equal(got, want):
            raise SystemExit(
                f"Pillow {PIL.__version__}: {w}x{h} -> {ow}x{oh} does not follow the pass-order rule "
                f"(matches the other order: {np.array_equal(got, other)})"
            )
        seen["vertical" if vertical_first else "horizontal"] += 1
    print(f"Pillow {PIL.__version__}: pass-order rule holds on {sum(seen.values())} shapes ({seen})")


def main():
    rng = np.random.default_rng(20261127)
    check_rule(rng)
    # (w, h, ow, oh): vertical first (the height shrinks most), horizontal first, the boundary
    # h - oh == 2 (w - ow) (horizontal first), upscales, mixed, one axis only, photo-like.
    shapes = [
        (37, 53, 32, 32),
        (53, 37, 32, 32),
        (40, 60, 30, 40),
        (40, 61, 30, 40),
        (20, 24, 32, 32),
        (12, 70, 30, 20),
        (70, 12, 20, 30),
        (64, 48, 64, 24),
        (48, 64, 24, 64),
        (120, 90, 32, 32),
        (90, 120, 32, 32),
        (33, 97, 17, 13),
    ]
    filters = [Image.Resampling.BICUBIC, Image.Resampling.BILINEAR, Image.Resampling.LANCZOS,
               Image.Resampling.BOX, Image.Resampling.HAMMING]
    tensors = {}
    i = 0
    for s, (w, h, ow, oh) in enumerate(shapes):
        for f in filters if s < 4 else [filters[s % len(filters)], Image.Resampling.BICUBIC]:
            channels = 1 if i % 4 == 3 else 3
            a = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
            img = Image.fromarray(a[:, :, 0] if channels == 1 else a)
            out = np.asarray(img.resize((ow, oh), f)).reshape(oh, ow, channels)
            tensors[f"{i}/in"] = torch.from_numpy(a.copy())
            tensors[f"{i}/out"] = torch.from_numpy(out.copy())
            tensors[f"{i}/spec"] = torch.tensor([ow, oh, int(f)], dtype=torch.int64)
            i += 1
    save_file(tensors, str(OUT), metadata={"pillow": PIL.__version__, "cases": str(i)})
    print(f"wrote {i} cases to {OUT}")


if __name__ == "__main__":
    main()
