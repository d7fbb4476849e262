#!/usr/bin/env python3
"""The files a `kiln synth paligemma2-3b-<RES>` folder lacks for a prompt run, with
PaliGemma's layout: a tokenizer (256000 base pieces, <loc>/<seg> after them, <image> =
257152), the released preprocessor_config.json at RES px, and a test image bench.jpg.
Used by scripts/bench_paligemma_ttft_cpu.sh and scripts/device_cuda.sh (the headline).

    make_paligemma_assets.py DIR RES
"""

import json
import sys

import numpy as np
from PIL import Image
from transformers import GemmaTokenizer

d, res = sys.argv[1], int(sys.argv[2])
vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
vocab.update({f"<0x{b:02X}>": 5 + b for b in range(256)})
for piece in ["▁", "c", "a", "p", "t", "i", "o", "n", "e"]:
    vocab.setdefault(piece, len(vocab))
while len(vocab) < 256000:
    vocab[f"▁w{len(vocab)}"] = len(vocab)
tok = GemmaTokenizer(vocab=vocab, merges=[])
tok.add_tokens([f"<loc{i:04d}>" for i in range(1024)] + [f"<seg{i:03d}>" for i in range(128)])
tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
assert tok.convert_tokens_to_ids("<image>") == 257152
tok.save_pretrained(d)
json.dump({"do_convert_rgb": None, "do_normalize": True, "do_rescale": True, "do_resize": True,
           "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "image_processor_type": "SiglipImageProcessor",
           "image_seq_length": (res // 14) ** 2, "processor_class": "PaliGemmaProcessor", "resample": 3,
           "rescale_factor": 1 / 255, "size": {"height": res, "width": res}}, open(f"{d}/preprocessor_config.json", "w"))
y, x = np.mgrid[0:480, 0:640]
img = np.stack([(x * 255 // 640), (y * 255 // 480), ((x + y) % 256)], -1).astype(np.uint8)
Image.fromarray(img).save(f"{d}/bench.jpg", quality=90)
