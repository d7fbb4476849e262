#!/usr/bin/env python3
"""Fixtures for `kiln rank` and `kiln ensemble` (tests/rank.rs, tests/ensemble.rs), NumPy only.

Independent reference implementations of the two algorithms the tests check kiln against:

* leave-one-out k-nearest-neighbour accuracy, cosine similarity, majority vote; ties: neighbours
  ordered by similarity then by index, and among classes with equally many votes the class of
  the nearest neighbour wins;
* greedy ensemble selection with replacement (Caruana et al. 2004) by the validation
  cross-entropy of the averaged softmax probabilities; equal losses: the first candidate wins.

Both compute similarities / sums in a plain sequential loop in float64, the order kiln uses, so
that mathematically equal values (the engineered ties) are bit-equal on both sides; the logic
(ordering, voting, averaging) is written here from the definitions, not translated from kiln.

Run from the repository root, in two steps:

    pip install numpy
    python3 scripts/gen_ensemble_fixtures.py data      # images, tie set, logits, resize inputs
    target/debug/kiln rank tests/fixtures/big_vision/vit_map_learn \\
        tests/fixtures/big_vision/vit_tok_sincos2d tests/fixtures/siglip/vision_map \\
        --data tests/fixtures/ensemble/data --k 3 --batch 4 \\
        --save-embeddings tests/fixtures/ensemble/embeddings
    python3 scripts/gen_ensemble_fixtures.py knn       # expected kNN results on those embeddings
"""

import json
import math
import os
import struct
import sys
import zlib

import numpy as np

OUT = os.path.join("tests", "fixtures", "ensemble")
CLASSES = ["amber", "blue_stripes", "green_dots"]
IMAGES_PER_CLASS = 5
SIZES = [(24, 20), (32, 32), (20, 28), (28, 24), (16, 16)]  # (height, width), odd shapes
KS = [1, 2, 3, 4, 5]


# ---- files ----

def write_png(path, rgb):
    """An 8-bit RGB PNG (filter 0 on every row), written with zlib alone."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].astype(np.uint8).tobytes() for y in range(h))

    def chunk(kind, data):
        c = kind + data
        return struct.pack(">I", len(data)) + c + struct.pack(">I", zlib.crc32(c) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)


DT = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32}


def write_safetensors(path, tensors):
    header, blobs, off = {}, [], 0
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        kind = {np.dtype(np.float32): "F32", np.dtype(np.int64): "I64"}[a.dtype]
        b = a.tobytes()
        header[name] = {"dtype": kind, "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def read_safetensors(path):
    b = open(path, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    header = json.loads(b[8:8 + n])
    out = {}
    for name, v in header.items():
        if name == "__metadata__":
            continue
        s, e = v["data_offsets"]
        out[name] = np.frombuffer(b[8 + n + s:8 + n + e], dtype=DT[v["dtype"]]).reshape(v["shape"])
    return out


# ---- reference algorithms ----

def unit_rows(emb):
    rows = []
    for r in emb.astype(np.float64):
        norm = math.sqrt(sum(float(x) * float(x) for x in r))
        rows.append([float(x) / norm if norm > 0 else 0.0 for x in r])
    return rows


def knn_loo(emb, labels, k):
    """Predicted label per example: leave-one-out kNN, cosine, majority vote (ties above)."""
    u = unit_rows(emb)
    n = len(labels)
    n_classes = int(labels.max()) + 1
    preds = []
    for i in range(n):
        others = np.array([j for j in range(n) if j != i])
        sims = np.array([sum(a * b for a, b in zip(u[i], u[j])) for j in others])
        order = np.lexsort((others, -sims))  # by similarity descending, then index ascending
        nearest = others[order[:k]]
        votes = np.bincount(labels[nearest], minlength=n_classes)
        tied = set(np.flatnonzero(votes == votes.max()).tolist())
        preds.append(next(int(labels[j]) for j in nearest if int(labels[j]) in tied))
    return preds


def softmax(x):
    z = np.exp(x - x.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def greedy_select(logits, labels, size):
    """Caruana's selection with replacement: (chosen, loss) per step and the counts."""
    probs = [softmax(np.asarray(l, np.float64))[np.arange(len(labels)), labels] for l in logits]
    running = np.zeros(len(labels))
    counts = [0] * len(logits)
    steps = []
    tiny = np.finfo(np.float64).tiny
    for t in range(size):
        losses = []
        for p in probs:
            terms = np.log(np.maximum((running + p) / (t + 1), tiny))
            losses.append(-sum(float(x) for x in terms) / len(labels))
        j = int(np.argmin(losses))  # the first of equal minima
        counts[j] += 1
        running = running + probs[j]
        steps.append({"chosen": j, "loss": losses[j]})
    return steps, counts


def resize_bilinear(x, oh, ow):
    """PyTorch interpolate(mode='bilinear', align_corners=False, antialias=False) on NHWC."""
    n, ih, iw, c = x.shape

    def taps(o_len, i_len):
        src = np.maximum((np.arange(o_len) + 0.5) * (i_len / o_len) - 0.5, 0.0)
        i0 = np.floor(src).astype(int)
        t = src - i0
        return np.minimum(i0, i_len - 1), np.minimum(i0 + 1, i_len - 1), t

    y0, y1, ty = taps(oh, ih)
    x0, x1, tx = taps(ow, iw)
    xd = x.astype(np.float64)
    top = xd[:, y0][:, :, x0] * (1 - tx)[None, None, :, None] + xd[:, y0][:, :, x1] * tx[None, None, :, None]
    bot = xd[:, y1][:, :, x0] * (1 - tx)[None, None, :, None] + xd[:, y1][:, :, x1] * tx[None, None, :, None]
    return (top * (1 - ty)[None, :, None, None] + bot * ty[None, :, None, None]).astype(np.float32)


# ---- fixtures ----

def make_image(cls, k, rng):
    h, w = SIZES[k % len(SIZES)]
    yy, xx = np.mgrid[0:h, 0:w]
    img = 120 + rng.normal(0, 70, (h, w, 3))
    if cls == 0:  # warm flat colour
        img += np.array([50, 20, -30])
    elif cls == 1:  # blue horizontal stripes
        img += np.where((yy // 3) % 2 == 0, 1.0, -0.5)[..., None] * np.array([-10, 10, 50])
    else:  # green dots on grey
        dots = ((yy % 6 - 3) ** 2 + (xx % 6 - 3) ** 2 < 5).astype(float)
        img += dots[..., None] * np.array([-30, 60, -30])
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def gen_data():
    rng = np.random.default_rng(21)
    data = os.path.join(OUT, "data")
    for c, name in enumerate(CLASSES):
        os.makedirs(os.path.join(data, name), exist_ok=True)
        for k in range(IMAGES_PER_CLASS):
            write_png(os.path.join(data, name, f"{k:02d}.png"), make_image(c, k, rng))

    # Embeddings with exact ties: {0,1} vectors times powers of two (unit rows are exact or
    # equal wherever the vectors are), labels drawn so that equal-similarity neighbours and
    # equal vote counts from different classes occur.
    protos = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0], [0, 0, 0, 1]], np.float32)
    pick = rng.integers(0, len(protos), 18)
    scale = 2.0 ** rng.integers(-1, 3, 18)
    emb = (protos[pick] * scale[:, None]).astype(np.float32)
    labels = rng.integers(0, 3, 18).astype(np.int64)
    write_safetensors(os.path.join(OUT, "ties.safetensors"), {"embeddings": emb, "labels": labels})
    ties = {str(k): knn_loo(emb, labels, k) for k in KS}

    # Greedy selection: 5 candidates over 40 examples and 4 classes. Candidate 1 is sure of
    # classes 0 and 1, candidate 2 of classes 2 and 3 (complementary), candidate 4 is
    # overconfident, and candidate 3 repeats candidate 1, so every step that picks 1 is a tie.
    n, c = 40, 4
    y = rng.integers(0, c, n)
    onehot = np.eye(c)[y]
    first_half = (y < 2)[:, None]
    noise = lambda s: s * rng.normal(size=(n, c))
    cands = [
        1.2 * onehot + noise(1.5),
        np.where(first_half, 3.0, 0.2) * onehot + noise(1.0),
        np.where(first_half, 0.2, 3.0) * onehot + noise(1.0),
        None,
        4.0 * (onehot + noise(1.5)),
    ]
    cands[3] = cands[1].copy()
    cands = [l.astype(np.float32) for l in cands]
    for j, l in enumerate(cands):
        write_safetensors(os.path.join(OUT, f"logits_{j}.safetensors"), {"logits": l})
    write_safetensors(os.path.join(OUT, "labels.safetensors"), {"labels": y.astype(np.int64)})
    steps, counts = greedy_select(cands, y, 7)
    select = {"size": 7, "steps": steps, "counts": counts, "weights": [k / 7 for k in counts]}

    # Ensemble inputs: images [2, 32, 32, 3] in [-1, 1] and their resizes for members at 24
    # and 16 px (kiln resizes inside the program; the test runs members on these).
    x = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    write_safetensors(os.path.join(OUT, "ensemble_inputs.safetensors"),
                      {"images": x, "images_24": resize_bilinear(x, 24, 24), "images_16": resize_bilinear(x, 16, 16)})

    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump({"ties": ties, "select": select}, f, indent=1)
        f.write("\n")


def gen_knn():
    """kNN on the embeddings `kiln rank --save-embeddings` wrote for the fixture models."""
    folder = os.path.join(OUT, "embeddings")
    out = {}
    for name in sorted(os.listdir(folder)):
        t = read_safetensors(os.path.join(folder, name))
        emb, labels = t["embeddings"], t["labels"].astype(np.int64)
        res = {}
        for k in KS:
            p = knn_loo(emb, labels, k)
            res[str(k)] = {"predictions": p, "correct": int(sum(int(a == b) for a, b in zip(p, labels)))}
        out[name] = res
    with open(os.path.join(OUT, "knn_expected.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    {"data": gen_data, "knn": gen_knn}[sys.argv[1] if len(sys.argv) > 1 else "data"]()
