#!/usr/bin/env python3
"""transformers peer for scripts/bench_decode_strategies_cpu.sh: generate() on a Gemma / Gemma 2
folder with one decoding strategy, timed end to end (prefill included).

    python scripts/bench_torch_decode_strategies.py MODEL_DIR --inputs in.safetensors \
        --max-new-tokens N --mode greedy|samples|beams [--threads 2]

greedy: do_sample=False; samples: do_sample=True, temperature 1, num_return_sequences=4;
beams: num_beams=4, num_return_sequences=1, min_new_tokens=N. EOS is disabled
(eos_token_id=None) so every row makes N tokens, as kiln's side is run. Prints one JSON line
with the seconds and tokens per second (new tokens of every returned row / seconds).
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import argparse
import json
import time

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--mode", choices=["greedy", "samples", "beams"], required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    ids = load_file(args.inputs)["input_ids"].long()
    n = args.max_new_tokens
    opts = dict(max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0)
    if args.mode == "greedy":
        opts.update(do_sample=False)
    elif args.mode == "samples":
        opts.update(do_sample=True, temperature=1.0, top_k=0, num_return_sequences=4)
    else:
        opts.update(do_sample=False, num_beams=4, num_return_sequences=1)
    torch.manual_seed(0)
    with torch.inference_mode():
        t = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **opts)
        secs = time.perf_counter() - t
    rows = out.shape[0]
    print(json.dumps({"peer": "transformers", "mode": args.mode, "torch": torch.__version__, "threads": args.threads,
                      "rows": rows, "new_tokens": n, "seconds": secs, "tokens_per_s": rows * n / secs}))


if __name__ == "__main__":
    main()
