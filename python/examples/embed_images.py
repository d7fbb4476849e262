"""Embed a folder of images with SigLIP into Parquet, on Ray Data through kiln.

    python embed_images.py <siglip-folder> <images-folder> <out-folder> \
        [--resolution 224] [--batch 16] [--actors 2] [--num-gpus 0] [--backend cpu]

The model is compiled once, here, for one batch and resolution; the artifact goes to every
actor through Ray's object store and each actor holds one session. Images are decoded and
resized by Ray Data (`read_images`), normalised as SigLIP's processor does, and the
`pooler_output` of each image is written with its path. On a cluster, start this with
`ray job submit` (or after `ray.init(address="auto")`); the checkpoint folder must be at the
same path on every node unless `--ship-weights` is given. On GPUs: `--backend cuda --num-gpus 1`
(one session per GPU).
"""

import argparse
import os

import ray

import kiln
import kiln.ray


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("images")
    ap.add_argument("out")
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--num-gpus", type=float, default=0)
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--ship-weights", action="store_true")
    a = ap.parse_args()

    # Joins the cluster named by RAY_ADDRESS (or one `ray start`ed here). A local one gets a
    # logical CPU per actor on top of the machine's cores, for the tasks that read the images:
    # each CPU actor holds one (Ray Data's default), and kiln's session uses every core anyway.
    ray.init(num_cpus=None if os.environ.get("RAY_ADDRESS") else (os.cpu_count() or 1) + a.actors)
    art = kiln.compile(a.model, batch=a.batch, resolution=a.resolution, backend=a.backend)
    ds = ray.data.read_images(a.images, include_paths=True, size=(a.resolution, a.resolution), mode="RGB")
    ds = kiln.ray.run(
        ds,
        art,
        inputs={"pixel_values": kiln.ray.siglip_pixels("image")},
        outputs={"pooler_output": "embedding"},
        keep=["path"],
        concurrency=a.actors,
        num_gpus=a.num_gpus,
        ship_weights=a.ship_weights,
    )
    ds.write_parquet(a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
