#!/usr/bin/env python3
"""PyTorch peer benchmark for a Gemma / Gemma 2 causal LM stored as a Hugging Face folder.

    /opt/kiln-venv/bin/python scripts/bench_torch_gemma.py MODEL_DIR --inputs in.safetensors \
        [--max-new-tokens 8] [--threads 2]

Loads the model in float32 on CPU (eager attention: transformers' Gemma 2 has no SDPA path
because of the soft-cap), runs one prefill over `input_ids` (batch 1) with a DynamicCache,
then greedy one-token decode steps through the cache, each timed. Prints one JSON line:
{"peer": "pytorch", "prefill_ms": ..., "decode_ms_per_token": ..., "decode_steps": N, ...}
and checks nothing: the kiln side is checked against transformers by the golden tests.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import argparse
import json
import time

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, DynamicCache


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    ids = load_file(args.inputs)["input_ids"].long()
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        t = time.perf_counter()
        out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - t
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        new_ids = [int(nxt)]
        steps = []
        pos = ids.shape[1]
        for _ in range(args.max_new_tokens - 1):
            t = time.perf_counter()
            out = model(input_ids=nxt, cache=cache, use_cache=True,
                        position_ids=torch.tensor([[pos]]), cache_position=torch.tensor([pos]))
            steps.append(time.perf_counter() - t)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            new_ids.append(int(nxt))
            pos += 1
    assert cache.get_seq_length() == pos, f"the cache holds {cache.get_seq_length()} tokens, not {pos}"
    print(json.dumps({"peer": "pytorch", "torch": torch.__version__, "threads": args.threads, "prompt_tokens": ids.shape[1],
                      "prefill_ms": prefill * 1e3, "decode_steps": len(steps),
                      "decode_ms_per_token": 1e3 * sum(steps) / max(len(steps), 1), "new_ids": new_ids}))


if __name__ == "__main__":
    main()
