#!/usr/bin/env python3
"""Tokenizer, image preprocessing and text-in/text-out generation fixtures from transformers.

Usage (from the repo root):

    /opt/kiln-venv/bin/python scripts/gen_tokenizer_fixtures.py [--out tests/fixtures/tokenizer]

Writes into the folder:
  paligemma/             a tiny random PaliGemma (32 px, patch 8: 16 image tokens) with
                         tokenizer.json (transformers' GemmaTokenizer: BPE with byte fallback,
                         "▁" normalizer, specials <pad> <eos> <bos> <unk> <mask> <image>, then
                         <loc0000>..<loc1023> and <seg000>..<seg127> as PaliGemmaProcessor adds
                         them), tokenizer_config.json, preprocessor_config.json (SigLIP: bicubic
                         resize to 32x32, rescale 1/255, normalise 0.5/0.5)
  gemma/                 a tiny random GemmaForCausalLM with the same tokenizer files
  images/                rgb_37x53.png, gray_20x24.png (upsampled), photo_61x45.jpg
  tokenizer_cases.json   per string: ids of tokenizer(s, add_special_tokens=False) and
                         decode(ids) through AutoTokenizer
  images_reference.safetensors
                         per image <stem>: `<stem>/resized` (uint8 HWC, PIL Image.resize bicubic
                         of the RGB image), `<stem>/pixel_values` (PaliGemmaProcessor's image
                         processor: SiglipImageProcessorPil when torchvision is not installed,
                         as in /opt/kiln-venv) and `<stem>/pixel_values_pil`
                         (SiglipImageProcessorPil built directly)
  generate_cases.json    PaliGemmaProcessor(text=prompt, images=image) ids and
                         generate(do_sample=False) new ids and decoded text; the same for the
                         Gemma model from "<bos>" + prompt
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import argparse
import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, normalizers, trainers

from transformers import (
    AutoTokenizer,
    GemmaConfig,
    GemmaForCausalLM,
    GemmaTokenizer,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    SiglipImageProcessor,
)
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "tests" / "fixtures" / "tokenizer"

CORPUS = [
    "caption en", "caption es", "describe en", "detect cat", "detect dog ; cat", "segment the car",
    "answer en what is in the image?", "a photo of a cat sitting on a bench", "two dogs playing in the snow",
    "the quick brown fox jumps over the lazy dog", "hello world", "a red car parked on the street",
    "question: how many people are there?", "ocr", "there are three birds on the wire",
]
STRINGS = [
    "caption en", "hello world", "  leading and   runs of   spaces  ", "tabs\tand\nnew\nlines\n",
    "unicode: héllo wörld ñ 日本語 Ωμέγα", "emoji 🦀🔥👍🏽 mixed", "<bos>detect cat<eos>", "<image><image>caption en",
    "<loc0100><loc0200><loc0500><loc1023> cat ; <seg005><seg127> dog", "<loc99> not a token", "", " ", "\n",
    "zzzz qqqq xylophone", "a photo of a cat sitting on a bench",
]
IMAGE_TOKENS = 16  # 32 px, patch 8
SIZE = 32


def build_tokenizer(folder: Path) -> GemmaTokenizer:
    """A small Gemma-layout vocabulary: 5 specials, 256 byte pieces, BPE merges from CORPUS."""
    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.normalizer = normalizers.Replace(" ", "▁")
    t.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=160, show_progress=False))
    trained = json.loads(t.to_str())["model"]
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tok = GemmaTokenizer(vocab=vocab, merges=merges)
    # What PaliGemmaProcessor.__init__ adds to a tokenizer without an image token.
    proc_like = PaliGemmaProcessor(image_processor=image_processor(), tokenizer=tok)
    tok = proc_like.tokenizer
    tok.add_bos_token = True
    tok.save_pretrained(str(folder))
    return tok


def image_processor(cls=SiglipImageProcessor):
    return cls(size={"height": SIZE, "width": SIZE}, resample=3, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
               image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_convert_rgb=True, image_seq_length=IMAGE_TOKENS)


PREPROCESSOR = {
    "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "SiglipImageProcessor", "image_seq_length": IMAGE_TOKENS, "image_std": [0.5, 0.5, 0.5],
    "processor_class": "PaliGemmaProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
    "size": {"height": SIZE, "width": SIZE},
}


def make_images(folder: Path) -> dict:
    """Smooth gradients plus noise and a sharp edge, so resampling errors show."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)

    def picture(w, h, c):
        y, x = np.mgrid[0:h, 0:w].astype(np.float64)
        base = np.stack([128 + 100 * np.sin(x / 5 + k) * np.cos(y / 7 - k) for k in range(c)], -1)
        base[h // 3:, w // 2:] = 255 - base[h // 3:, w // 2:]
        return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)

    paths = {}
    Image.fromarray(picture(37, 53, 3), "RGB").save(folder / "rgb_37x53.png")
    paths["rgb_37x53"] = folder / "rgb_37x53.png"
    Image.fromarray(picture(20, 24, 1)[..., 0], "L").save(folder / "gray_20x24.png")
    paths["gray_20x24"] = folder / "gray_20x24.png"
    Image.fromarray(picture(61, 45, 3), "RGB").save(folder / "photo_61x45.jpg", quality=90)
    paths["photo_61x45"] = folder / "photo_61x45.jpg"
    return paths


def randomize_(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "vision_tower" in name and ("layer_norm" in name or "post_layernorm" in name):
                v = (1.0 if name.endswith("weight") else 0.0) + torch.randn(p.shape, generator=gen) * 0.25
            elif name.endswith("norm.weight") or "layernorm" in name:
                v = torch.randn(p.shape, generator=gen) * 0.25
            elif p.dim() == 1:
                v = torch.randn(p.shape, generator=gen) * 0.2
            elif "patch_embedding" in name:
                v = torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel())
            elif "position_embedding" in name:
                v = torch.randn(p.shape, generator=gen) * 0.5
            elif "embed_tokens" in name:
                v = torch.randn(p.shape, generator=gen) * 0.5
            else:
                v = torch.randn(p.shape, generator=gen) * 2.0 / math.sqrt(p.shape[1])
            p.copy_(v)


def text_config(vocab: int) -> dict:
    return dict(vocab_size=vocab, hidden_size=48, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                head_dim=24, intermediate_size=64, max_position_embeddings=128, pad_token_id=0, bos_token_id=2,
                eos_token_id=1, hidden_act="gelu_pytorch_tanh")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    out = args.out
    if out.exists():
        shutil.rmtree(out)
    pali_dir, gemma_dir = out / "paligemma", out / "gemma"
    pali_dir.mkdir(parents=True)
    gemma_dir.mkdir(parents=True)

    tok = build_tokenizer(pali_dir)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(pali_dir / f, gemma_dir / f)
    (pali_dir / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2, sort_keys=True) + "\n")
    tok = AutoTokenizer.from_pretrained(str(pali_dir))
    vocab = len(tok)
    image_id = tok.convert_tokens_to_ids("<image>")

    cases = []
    for s in STRINGS:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        cases.append({"text": s, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=False),
                      "decoded_skip_special": tok.decode(ids, skip_special_tokens=True)})
    meta = {"vocab": vocab, "image_token_id": image_id, "loc0000": tok.convert_tokens_to_ids("<loc0000>"),
            "seg000": tok.convert_tokens_to_ids("<seg000>"), "cases": cases}
    (out / "tokenizer_cases.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")

    # Images: PIL's own resize, and both transformers image processors.
    paths = make_images(out / "images")
    proc = PaliGemmaProcessor.from_pretrained(str(pali_dir))
    # Without torchvision, transformers 5 falls back to the PIL backend; say which one made the reference.
    report = [f"image processor: {type(proc.image_processor).__name__}"]
    pil_proc = image_processor(SiglipImageProcessorPil)
    tensors = {}
    for stem, path in paths.items():
        img = Image.open(path).convert("RGB")
        tensors[f"{stem}/resized"] = torch.from_numpy(np.asarray(img.resize((SIZE, SIZE), Image.Resampling.BICUBIC)).copy())
        pv = proc.image_processor(Image.open(path), return_tensors="pt")["pixel_values"][0]
        pv_pil = torch.from_numpy(np.asarray(pil_proc(Image.open(path), return_tensors="np")["pixel_values"][0])).float()
        tensors[f"{stem}/pixel_values"] = pv
        tensors[f"{stem}/pixel_values_pil"] = pv_pil
        report.append(f"{stem}: torchvision vs PIL processor max |diff| {float((pv - pv_pil).abs().max()):.4f}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "images_reference.safetensors"))

    # Generation: PaliGemma from text + image, Gemma from "<bos>" + text.
    gen_cases = {}
    cfg = PaliGemmaConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, num_attention_heads=2, intermediate_size=64,
                           num_hidden_layers=2, image_size=SIZE, patch_size=8, hidden_act="gelu_pytorch_tanh",
                           vision_use_head=False),
        text_config=dict(model_type="gemma", **text_config(vocab)),
        image_token_index=image_id, vocab_size=vocab, projection_dim=48, hidden_size=48,
    )
    torch.manual_seed(21)
    model = PaliGemmaForConditionalGeneration(cfg)
    randomize_(model, 21)
    model.save_pretrained(str(pali_dir), safe_serialization=True)
    model = PaliGemmaForConditionalGeneration.from_pretrained(str(pali_dir), attn_implementation="eager", dtype=torch.float32).eval()
    new = 10
    runs = []
    for prompt, stem in [("caption en", "rgb_37x53"), ("detect cat ; dog", "photo_61x45")]:
        inputs = proc(text="<image>" + prompt, images=Image.open(paths[stem]), return_tensors="pt")
        with torch.no_grad():
            g = model.generate(**inputs, max_new_tokens=new, do_sample=False)
        n = inputs["input_ids"].shape[1]
        ids = g[0, n:].tolist()
        runs.append({"prompt": prompt, "image": f"images/{paths[stem].name}", "max_new_tokens": new,
                     "input_ids": inputs["input_ids"][0].tolist(), "token_type_ids": inputs["token_type_ids"][0].tolist(),
                     "new_ids": ids, "text": proc.decode(ids, skip_special_tokens=True)})
    gen_cases["paligemma"] = runs

    torch.manual_seed(22)
    gcfg = GemmaConfig(**text_config(vocab), rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})
    gm = GemmaForCausalLM(gcfg)
    randomize_(gm, 22)
    gm.save_pretrained(str(gemma_dir), safe_serialization=True)
    gm = GemmaForCausalLM.from_pretrained(str(gemma_dir), attn_implementation="eager", dtype=torch.float32).eval()
    runs = []
    for prompt in ["hello world", "unicode: héllo 🦀"]:
        ids = tok("<bos>" + prompt, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            g = gm.generate(**ids, max_new_tokens=new, do_sample=False)
        n = ids["input_ids"].shape[1]
        new_ids = g[0, n:].tolist()
        runs.append({"prompt": prompt, "max_new_tokens": new, "input_ids": ids["input_ids"][0].tolist(), "new_ids": new_ids,
                     "text": tok.decode(new_ids, skip_special_tokens=True)})
    gen_cases["gemma"] = runs
    (out / "generate_cases.json").write_text(json.dumps(gen_cases, indent=1, ensure_ascii=False) + "\n")
    print("\n".join(report))
    print(json.dumps(gen_cases, ensure_ascii=False)[:2000])


if __name__ == "__main__":
    main()
