#!/usr/bin/env python3
"""PyTorch peers on the GPU (part of scripts/device_cuda.sh): bf16, SDPA attention, eager or
torch.compile, random weights from a `kiln synth` folder. One JSON line on stdout.

    bench_torch_cuda.py siglip DIR --batch 32 [--resolution R] --mode eager|compile
    bench_torch_cuda.py gemma DIR --what prefill|decode --mode eager|compile
    bench_torch_cuda.py paligemma DIR [--new-tokens 32]: the headline, time to first token and
        decode per token of a `kiln synth paligemma2-3b-<RES>` folder with
        scripts/make_paligemma_assets.py's files (eager: transformers' generate, bf16, SDPA)
    bench_torch_cuda.py ceiling -: the card's measured ceilings (bf16 8192^3 GEMM TFLOP/s,
        device-to-device copy TB/s counting bytes read and written, host-to-device GB/s from
        pinned memory)

siglip: median ms of model(pixel_values) over --runs after warm-up (CUDA events).
gemma prefill: one forward of 1024 tokens. gemma decode: ms per token of greedy decoding
with a static cache (`generate`, 64 new tokens after a 16-token prompt; compile mode is
transformers' own compilation of the static-cache step, eager passes disable_compile=True).
paligemma: first_token_ms is PaliGemmaProcessor on bench.jpg and "caption en" plus
generate(max_new_tokens=1) (host preprocessing, the So400m tower and the prefill over the
image tokens), the median of 3 after one warm-up, as kiln generate's first_token_ms counts
it; decode_ms_per_token is (generate(N + 1) - generate(1)) / N with min_new_tokens forcing N.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import argparse
import json
import statistics

import torch


def timed(fn, runs):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return times


def paligemma(a, dev, dt):
    from PIL import Image
    from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

    m = PaliGemmaForConditionalGeneration.from_pretrained(a.model_dir, dtype=dt, attn_implementation="sdpa").to(dev).eval()
    proc = PaliGemmaProcessor.from_pretrained(a.model_dir)
    img = Image.open(f"{a.model_dir}/bench.jpg")
    seen = {}

    def go(n):
        inputs = proc(text="<image>caption en", images=img, return_tensors="pt").to(dev)
        inputs["pixel_values"] = inputs["pixel_values"].to(dt)
        seen["prompt_tokens"] = inputs["input_ids"].shape[1]
        kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False)
        if a.mode == "eager":
            kw["disable_compile"] = True
        else:
            kw["cache_implementation"] = "static"
        m.generate(**inputs, **kw)

    first = timed(lambda: go(1), 3)
    full = timed(lambda: go(a.new_tokens + 1), 3)
    per = (statistics.median(full) - statistics.median(first)) / a.new_tokens
    return {"first_token_ms": statistics.median(first), "decode_ms_per_token": per, "new_tokens": a.new_tokens,
            "prompt_tokens": seen["prompt_tokens"], "resolution": m.config.vision_config.image_size}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["siglip", "gemma", "paligemma", "ceiling"])
    ap.add_argument("model_dir")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--resolution", type=int, default=None)
    ap.add_argument("--mode", choices=["eager", "compile"], default="eager")
    ap.add_argument("--what", choices=["prefill", "decode"], default="prefill")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    ap.add_argument("--new-tokens", type=int, default=32)
    a = ap.parse_args()
    dev, dt = "cuda", {"bf16": torch.bfloat16, "f32": torch.float32}[a.dtype]
    torch.backends.cuda.matmul.allow_tf32 = False  # f32 means f32, as kiln computes it
    if a.kind == "ceiling":
        x = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
        t = timed(lambda: x @ x, 10)
        big = torch.empty(1 << 30, device=dev, dtype=torch.uint8)
        dst = torch.empty_like(big)
        c = timed(lambda: dst.copy_(big), 10)
        # Host to device over PCIe from pinned memory: what a weight upload at load can reach.
        host = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
        h = timed(lambda: big.copy_(host, non_blocking=True), 5)
        print(json.dumps({"device": torch.cuda.get_device_name(), "gemm_bf16_tflops": 2 * 8192**3 / (statistics.median(t) * 1e-3) / 1e12,
                          "copy_tbps": 2 * (1 << 30) / (statistics.median(c) * 1e-3) / 1e12,
                          "h2d_pinned_gbps": (1 << 30) / (statistics.median(h) * 1e-3) / 1e9}))
        return
    out = {"peer": f"torch-{a.mode}", "dtype": a.dtype, "torch": torch.__version__, "device": torch.cuda.get_device_name()}
    with torch.inference_mode():
        if a.kind == "siglip":
            from transformers import SiglipVisionModel

            m = SiglipVisionModel.from_pretrained(a.model_dir, dtype=dt, attn_implementation="sdpa").to(dev).eval()
            r = a.resolution or m.config.image_size
            x = torch.randn(a.batch, 3, r, r, device=dev, dtype=dt)
            f = torch.compile(m) if a.mode == "compile" else m
            t = timed(lambda: f(pixel_values=x), a.runs)
            out.update(batch=a.batch, resolution=r)
        elif a.kind == "paligemma":
            out.update(paligemma(a, dev, dt))
            print(json.dumps(out))
            return
        else:
            from transformers import Gemma2ForCausalLM

            m = Gemma2ForCausalLM.from_pretrained(a.model_dir, dtype=dt, attn_implementation="sdpa").to(dev).eval()
            if a.what == "prefill":
                ids = torch.randint(2, m.config.vocab_size, (1, 1024), device=dev)
                f = torch.compile(m) if a.mode == "compile" else m
                t = timed(lambda: f(input_ids=ids, use_cache=False), max(3, a.runs // 4))
            else:
                ids = torch.randint(2, m.config.vocab_size, (1, 16), device=dev)
                kw = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False, cache_implementation="static")
                # transformers compiles the decode step of a static cache by itself (inductor,
                # CUDA graphs): that is the compile peer; eager turns it off.
                if a.mode == "eager":
                    kw["disable_compile"] = True
                t = [x / 64 for x in timed(lambda: m.generate(ids, **kw), 3)]
                out["per"] = "token"
    out.update(min_ms=min(t), median_ms=statistics.median(t), max_ms=max(t), runs=len(t))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
