#!/usr/bin/env python3
"""The table that ends scripts/device_cuda.sh: one line per (model, batch, engine) from its
timings.jsonl, with kiln's ratio to each peer measured in the same run and the achieved
TFLOP/s (SigLIP, Gemma prefill) or TB/s (Gemma decode) beside the card's ceiling measured in
the same run (the `ceiling` row). Where a load option's row (`kiln-cuda-pdl-on`,
`kiln-cuda-fuse-off`) was measured beside the default `kiln-cuda`, a line after the table
gives both times and their ratio.

    device_summary.py timings.jsonl

kiln rows use `device_median_ms` (inputs already on the GPU, as the peers are timed) when
present; `median_ms` includes kiln's host copies. FLOPs are counted from the shapes: the
matmuls and the two attention products of each layer (So400m/14: width 1152, 27 layers, MLP
4304; Gemma 2 2B: 26 layers, width 2304, 8 query / 4 KV heads of 256, MLP 9216, vocabulary
256000); decode bytes are the bf16 weights read once per token (2.61e9 parameters).
"""

import json
import sys


def siglip_flops(res, batch):
    n, w, mlp, layers = (res // 14) ** 2, 1152, 4304, 27
    per_layer = 2 * n * (4 * w * w + 2 * w * mlp) + 2 * 2 * n * n * w
    return batch * (layers * per_layer + 2 * n * 14 * 14 * 3 * w)


def gemma_prefill_flops(t):
    layers, w, hq, hkv, d, mlp, vocab = 26, 2304, 8, 4, 256, 9216, 256000
    proj = 2 * t * w * (hq * d + 2 * hkv * d + hq * d) + 2 * t * 3 * w * mlp
    attn = 2 * 2 * t * t * hq * d  # causal: half of it is masked; counted whole, as peers count
    return layers * (proj + attn) + 2 * t * w * vocab


GEMMA_DECODE_BYTES = 2.61e9 * 2


def ms_of(r):
    res = r["result"]
    for key in ("device_median_ms", "median_ms", "decode_ms_per_token"):
        if isinstance(res.get(key), (int, float)):
            return res[key], key
    return None, res.get("error", "no result")


def main():
    rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
    ceiling = next((r["result"] for r in rows if r["engine"] == "ceiling"), {})
    tf_max, tb_max = ceiling.get("gemm_bf16_tflops"), ceiling.get("copy_tbps")
    if tf_max:
        h2d = ceiling.get("h2d_pinned_gbps")
        pcie = f", host to device {h2d:.1f} GB/s (pinned)" if h2d else ""
        print(f"card ceilings measured in this run: bf16 GEMM 8192^3 {tf_max:.0f} TFLOP/s, device copy {tb_max:.2f} TB/s{pcie}")
    print(f"{'model':<24} {'batch':>5} {'engine':<16} {'ms':>9} {'rate':>22} {'vs eager':>9} {'vs compile':>10}")
    groups = {}
    for r in rows:
        if r["engine"] != "ceiling":
            groups.setdefault((r["model"], r["batch"]), []).append(r)
    for (model, batch), rs in groups.items():
        peers = {r["engine"]: ms_of(r)[0] for r in rs}
        for r in rs:
            ms, key = ms_of(r)
            if ms is None:
                print(f"{model:<24} {batch:>5} {r['engine']:<16} {'error':>9}  {str(key)[:60]}")
                continue
            rate = ""
            if model.startswith("so400m"):
                tf = siglip_flops(int(model.split("-")[1]), batch) / (ms * 1e-3) / 1e12
                rate = f"{tf:.0f} TFLOP/s" + (f" ({tf / tf_max:.0%})" if tf_max else "")
            elif "prefill" in model:
                last = model.split()[-1]
                tf = gemma_prefill_flops(int(last) if last.isdigit() else 1024) / (ms * 1e-3) / 1e12
                rate = f"{tf:.0f} TFLOP/s" + (f" ({tf / tf_max:.0%})" if tf_max else "")
            elif "decode" in model:
                tb = GEMMA_DECODE_BYTES / (ms * 1e-3) / 1e12
                rate = f"{tb:.2f} TB/s" + (f" ({tb / tb_max:.0%})" if tb_max else "")
            ratios = ["", ""]
            if r["engine"].startswith("kiln"):
                for i, peer in enumerate(("torch-eager", "torch-compile")):
                    if peers.get(peer):
                        ratios[i] = f"{peers[peer] / ms:.2f}x"
                if r["engine"] == "kiln-cube-cuda" and peers.get("torch-eager-f32"):
                    ratios[0] = f"{peers['torch-eager-f32'] / ms:.2f}x f32"
            print(f"{model:<24} {batch:>5} {r['engine']:<16} {ms:>9.3f} {rate:>22} {ratios[0]:>9} {ratios[1]:>10}")
    # Load-option A/B rows of one model measured in this run (scripts/device_cuda.sh, gemma).
    for (model, batch), rs in groups.items():
        ms = {r["engine"]: ms_of(r)[0] for r in rs}
        for engine, what in (("kiln-cuda-pdl-on", "--cuda-pdl on"), ("kiln-cuda-fuse-off", "--cuda-fuse off")):
            if ms.get(engine) and ms.get("kiln-cuda"):
                print(f"{model} b{batch}: {what} {ms[engine]:.3f} ms, default {ms['kiln-cuda']:.3f} ms (default / {what}: {ms['kiln-cuda'] / ms[engine]:.3f}x)")
    print("ratios: peer time / kiln time (above 1: kiln faster); kiln times are device times where measured")


if __name__ == "__main__":
    main()
