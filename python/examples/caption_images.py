"""Caption or detect with PaliGemma over a folder of images, on Ray Data through kiln.

    python caption_images.py <paligemma-folder> <images-folder> <out-folder> \
        [--prompt "caption en" | --prompt "detect cat ; dog"] [--seq-len 300] \
        [--max-new-tokens 32] [--actors 2] [--num-gpus 0] [--backend cpu]

Each actor holds one session of the generation program (compiled once, here, for batch 1 and a
prompt bucket of --seq-len tokens: PaliGemma's image tokens plus the prompt) and answers the
prompt for each image as `kiln generate --prompt --image` does. Writes Parquet with the
columns `path`, `text` (the answer) and `boxes` (one `label ymin xmin ymax xmax` line per
detected `<loc>` box, coordinates in [0, 1]).
"""

import argparse
import os
from pathlib import Path

import ray

import kiln
import kiln.ray


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("images")
    ap.add_argument("out")
    ap.add_argument("--prompt", default="caption en")
    ap.add_argument("--seq-len", type=int, default=300)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--num-gpus", type=float, default=0)
    ap.add_argument("--backend", default="cpu")
    a = ap.parse_args()

    # Joins the cluster named by RAY_ADDRESS (or one `ray start`ed here). A local one gets a
    # logical CPU per actor on top of the machine's cores, for the tasks that read the images:
    # each CPU actor holds one (Ray Data's default), and kiln's session uses every core anyway.
    ray.init(num_cpus=None if os.environ.get("RAY_ADDRESS") else (os.cpu_count() or 1) + a.actors)
    art = kiln.compile(a.model, generate=True, batch=1, seq_len=a.seq_len, max_new_tokens=a.max_new_tokens, backend=a.backend)
    paths = sorted(str(p) for p in Path(a.images).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    ds = ray.data.from_items([{"path": p} for p in paths])
    ds = kiln.ray.generate(ds, art, prompt=a.prompt, concurrency=a.actors, num_gpus=a.num_gpus)
    ds.write_parquet(a.out)
    print(f"wrote {a.out}: {len(paths)} images")


if __name__ == "__main__":
    main()
