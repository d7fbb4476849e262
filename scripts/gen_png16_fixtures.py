#!/usr/bin/env python3
"""16-bit PNGs and what Pillow (transformers' image loader) reads from them, for
tests/tokenizer_images.rs: Pillow takes the high byte of 16-bit RGB, RGBA and grey+alpha
samples and clips 16-bit grey ("I;16") at 255 when converting to RGB; transformers'
convert_to_rgb then composites any alpha onto white. Writes into tests/fixtures/png16/:
rgb16.png, rgba16.png, la16.png, grey16.png and png16.json ({file: [[r, g, b], ...]} after
transformers.image_transforms.convert_to_rgb's Pillow steps). Run from the repository root with
numpy and Pillow (the Python tests' venv has both: .venv/bin/python scripts/gen_png16_fixtures.py).
"""
import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

OUT = Path("tests/fixtures/png16")


def png(path, arr, ctype):
    """A 16-bit PNG of colour type `ctype` (0 grey, 2 RGB, 4 grey+alpha, 6 RGBA), written by hand
    so that every sample value is exactly the one given."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, ctype, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def to_rgb(path):
    """transformers' convert_to_rgb on Pillow's image: RGB kept, else RGBA composited on white."""
    im = Image.open(path)
    if im.mode != "RGB":
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255))
        im = Image.alpha_composite(white, im).convert("RGB")
    return [list(p) for p in im.get_flattened_data()]


rng = np.random.default_rng(16)
values = np.concatenate([[0, 1, 255, 256, 257, 511, 1000, 32768, 65280, 65535], rng.integers(0, 65536, 54)]).astype(np.uint16)
cases = {
    "rgb16.png": (values[:48].reshape(4, 4, 3), 2),
    "rgba16.png": (values[:48].reshape(3, 4, 4), 6),
    "la16.png": (values[:32].reshape(4, 4, 2), 4),
    "grey16.png": (values[:16].reshape(4, 4), 0),
}
want = {}
for name, (arr, ctype) in cases.items():
    png(OUT / name, arr, ctype)
    want[name] = to_rgb(OUT / name)
(OUT / "png16.json").write_text(json.dumps(want, separators=(",", ":")) + "\n")
print({k: Image.open(OUT / k).mode for k in cases})
