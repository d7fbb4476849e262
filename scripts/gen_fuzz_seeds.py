#!/usr/bin/env python3
"""Writes the fuzz seed corpora, fuzz/corpus/<target>/, from the repository's fixtures.

Small valid inputs of each format (and a few near-misses), so that mutations reach the code
behind the first checks. Needs numpy; the artifact seeds need a built kiln binary:

    python3 scripts/gen_fuzz_seeds.py target/debug/kiln
"""

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
OUT = os.path.join(ROOT, "fuzz", "corpus")

# As kiln::fuzz::CONFIG_FOLDERS (the first byte of a config seed picks the folder).
CONFIG_FOLDERS = [
    "siglip/vision_map",
    "siglip/siglip_full",
    "gemma/gemma2_gqa",
    "gemma/paligemma",
    "big_vision/vit_map_learn",
    "big_vision/vmoe",
    "big_vision/cappa_captioner",
    "big_vision/jetformer",
    "big_vision/uvim_vqvae",
    "big_vision/paligemma_bv",
    "big_vision/vit_tok_sincos2d",
    "jet",
]


def put(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def safetensors_bytes(tensors, metadata=None):
    header, blobs, off = {}, [], 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    if metadata:
        header["__metadata__"] = metadata
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def images(b, h, w, seed):
    x = np.random.default_rng(seed).uniform(-1, 1, size=(b, h, w, 3)).astype(np.float32)
    return ("F32", x.shape, x.tobytes())


def main():
    kiln = sys.argv[1] if len(sys.argv) > 1 else None
    shutil.rmtree(OUT, ignore_errors=True)

    # safetensors: every dtype, an empty file, metadata, a scalar.
    put("safetensors", "empty", safetensors_bytes({}))
    put("safetensors", "dtypes", safetensors_bytes({
        "f32": ("F32", [2, 3], np.arange(6, dtype=np.float32).tobytes()),
        "f16": ("F16", [3], np.ones(3, dtype=np.float16).tobytes()),
        "bf16": ("BF16", [2], b"\x80\x3f\x00\x40"),
        "i64": ("I64", [2], np.array([1, -1], dtype=np.int64).tobytes()),
        "i32": ("I32", [1], np.array([7], dtype=np.int32).tobytes()),
        "u8": ("U8", [4], bytes([0, 1, 2, 255])),
        "bool": ("BOOL", [2], bytes([0, 1])),
        "f64": ("F64", [1], np.array([0.5]).tobytes()),
    }))
    put("safetensors", "meta_scalar", safetensors_bytes({"s": ("F32", [], np.float32(3).tobytes())}, {"format": "pt"}))

    # npz / npy: stored and deflated members, several dtypes, Fortran order, a scalar.
    arrays = {
        "params/embedding/kernel": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
        "params/bias": np.zeros(3, dtype=np.float32),
        "i": np.array([1, 2], dtype=np.int64),
        "f": np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
        "s": np.float32(1.5),
    }
    simple = {k: arrays[k] for k in ["params/embedding/kernel", "params/bias", "i"]}
    for name, fn, content in [("stored", np.savez, simple), ("deflated", np.savez_compressed, simple),
                              ("stored_all", np.savez, arrays), ("deflated_all", np.savez_compressed, arrays)]:
        buf = io.BytesIO()
        fn(buf, **content)
        put("npz", name, buf.getvalue())
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("not_npy.txt", b"hello")
    put("npz", "not_npy", buf.getvalue())
    for name, a in [("f32", arrays["params/embedding/kernel"]), ("fortran", arrays["f"]), ("scalar", arrays["s"]),
                    ("i64", arrays["i"]), ("bf", np.zeros((1, 2), dtype=">f4"))]:
        buf = io.BytesIO()
        np.save(buf, a)
        put("npy", name, buf.getvalue())

    # config.json of each family, the first byte naming its folder.
    for i, folder in enumerate(CONFIG_FOLDERS):
        with open(os.path.join(FIX, folder, "config.json"), "rb") as f:
            put("config", folder.replace("/", "_"), bytes([i]) + f.read())

    # Tokenizers: the fixtures' SentencePiece models and tokenizer.json, and a tiny hand-made one.
    with open(os.path.join(FIX, "spm", "json", "tokenizer.json"), "rb") as f:
        put("tokenizer_json", "gemma_like", f.read())
    tiny = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": 3, "content": "<image>", "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True}],
        "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "a": 1, "photo": 2, "<image>": 3}, "unk_token": "<unk>"},
    }
    put("tokenizer_json", "wordlevel", json.dumps(tiny).encode())
    for name in ["tiny", "unigram"]:
        with open(os.path.join(FIX, "spm", name, "tokenizer.model"), "rb") as f:
            put("spm_model", name, f.read())

    # Images: PNG (8- and 16-bit, grey, alpha) and a JPEG.
    for path in ["tokenizer/images/gray_20x24.png", "tokenizer/images/photo_61x45.jpg", "png16/la16.png", "png16/grey16.png",
                 "ensemble/data/amber/00.png"]:
        with open(os.path.join(FIX, path), "rb") as f:
            put("image", os.path.basename(path), f.read())

    # kiln run's inputs for the tiny ViT (batch 1, 24x24) and near-misses of them.
    put("run_inputs", "images", safetensors_bytes({"images": images(1, 24, 24, 0)}))
    put("run_inputs", "images_b2", safetensors_bytes({"images": images(2, 24, 24, 1)}))
    put("run_inputs", "images_wrong_name", safetensors_bytes({"pixel_values": images(1, 24, 24, 2)}))

    # Artifacts: the tiny ViT compiled, and a generation program.
    if kiln:
        with tempfile.TemporaryDirectory() as d:
            for name, args in [("vit", [os.path.join(FIX, "big_vision/vit_map_learn")]),
                               ("gemma_gen", [os.path.join(FIX, "gemma/gemma2_gqa"), "--generate", "--seq-len", "4",
                                              "--max-new-tokens", "2"])]:
                out = os.path.join(d, name + ".kiln")
                subprocess.run([kiln, "compile", *args, "-o", out], check=True, stdout=subprocess.DEVNULL)
                with open(out, "rb") as f:
                    put("artifact", name, f.read())
    else:
        print("no kiln binary given: artifact seeds not written", file=sys.stderr)
    for t in sorted(os.listdir(OUT)):
        files = os.listdir(os.path.join(OUT, t))
        size = sum(os.path.getsize(os.path.join(OUT, t, f)) for f in files)
        print(f"{t}: {len(files)} seeds, {size} bytes")


if __name__ == "__main__":
    main()
