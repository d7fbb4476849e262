#!/usr/bin/env python3
"""Reference for pasting PaliGemma <seg> masks into their boxes: big_vision's segmentation
evaluator resizes each 64x64 float mask to the box with PIL (`Image.fromarray(m64).resize([w,
h], resample=PIL.Image.BILINEAR)`, mode "F") and thresholds at 0. This resizes the official
decoder's reference masks (tests/fixtures/big_vision/paligemma_seg_decoder/reference.safetensors)
to box sizes that upsample, downsample (PIL then widens its triangle filter) and mix both,
and writes pil_resize.safetensors beside them. Needs Pillow and NumPy (pip install pillow
numpy; made with Pillow 13.0.0, NumPy 2.4.6). Run from the repository root."""
import json, struct
import numpy as np
import PIL
import PIL.Image

DIR = "tests/fixtures/big_vision/paligemma_seg_decoder"
SIZES = [(150, 90), (37, 23), (64, 64), (100, 20), (5, 1), (300, 211)]  # (width, height)


def read(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        dt = {"F32": np.float32, "I64": np.int64}[v["dtype"]]
        out[k] = np.frombuffer(raw[8 + n + a:8 + n + b], dtype=dt).reshape(v["shape"])
    return out


masks = read(f"{DIR}/reference.safetensors")["masks"][..., 0]
tensors = {}
for i, m in enumerate(masks):
    for w, h in SIZES:
        r = np.asarray(PIL.Image.fromarray(m.astype(np.float32)).resize([w, h], resample=PIL.Image.BILINEAR), dtype=np.float32)
        assert r.shape == (h, w), r.shape
        tensors[f"resize/{i}/{w}x{h}"] = r
header, data = {"__metadata__": {"pillow": PIL.__version__}}, b""
for k in sorted(tensors):
    b = tensors[k].tobytes()
    header[k] = {"dtype": "F32", "shape": list(tensors[k].shape), "data_offsets": [len(data), len(data) + len(b)]}
    data += b
h = json.dumps(header).encode()
h += b" " * (-len(h) % 8)
with open(f"{DIR}/pil_resize.safetensors", "wb") as f:
    f.write(struct.pack("<Q", len(h)) + h + data)
print(f"wrote {len(tensors)} resized masks (Pillow {PIL.__version__})")
