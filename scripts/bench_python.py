"""kiln's Python package on the CPU: images/s of a SigLIP through Ray Data (kiln.ray, 1 and 2
actors) against single-process `Session.run` on the same images, and the Python call overhead
per `run` on a tiny model against the CLI's own timing of the same artifact (`kiln bench`).
Every configuration runs in each repeat, in turn, so a noisy neighbour hits all of them; every
run is printed. Run through scripts/bench_python_cpu.sh."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time

import numpy as np

import kiln
import kiln.ray


def single(s: kiln.Session, images: np.ndarray, batch: int, pre) -> float:
    t = time.perf_counter()
    for k in range(0, len(images), batch):
        s.run({"pixel_values": pre({"data": images[k : k + batch]})})
    return len(images) / (time.perf_counter() - t)


def through_ray(art: kiln.Artifact, images: np.ndarray, actors: int, threads: int | None) -> float:
    import ray

    extra = {}
    if threads is not None:
        extra["runtime_env"] = {"env_vars": {"RAYON_NUM_THREADS": str(threads)}}
    t = time.perf_counter()
    ds = ray.data.from_numpy(images)
    ds = kiln.ray.run(ds, art, inputs={"pixel_values": kiln.ray.siglip_pixels("data")}, concurrency=actors, **extra)
    n = ds.materialize().count()
    assert n == len(images)
    return n / (time.perf_counter() - t)


def overhead(tiny: str, kiln_bin: str, calls: int, tmp: str) -> tuple[float, float]:
    """(Python Session.run median ms, `kiln bench` median ms) for batch 1 of `tiny`."""
    art = kiln.compile(tiny, batch=1)
    path = os.path.join(tmp, "tiny.kiln")
    art.save(path)
    s = art.session()
    x = np.random.default_rng(0).standard_normal(s.inputs[0].shape).astype(np.float32)
    for _ in range(50):
        s.run({"pixel_values": x})
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        s.run({"pixel_values": x})
        times.append(time.perf_counter() - t)
    py = float(np.median(times) * 1e3)
    out = subprocess.run([kiln_bin, "bench", path, "--runs", str(calls), "--json"], capture_output=True, text=True, check=True)
    cli = json.loads(out.stdout.strip().splitlines()[-1])["median_ms"]
    return py, float(cli)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--resolution", type=int, default=112)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny", required=True)
    ap.add_argument("--kiln", required=True)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--tmp", default="bench-out/python")
    a = ap.parse_args()

    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    art = kiln.compile(a.model, batch=a.batch, resolution=a.resolution)
    s = art.session()
    images = np.random.default_rng(1).integers(0, 256, (a.images, a.resolution, a.resolution, 3), dtype=np.uint8)
    pre = kiln.ray.siglip_pixels("data")
    single(s, images[: a.batch * 2], a.batch, pre)  # warm-up
    configs = [
        ("single-process Session.run", lambda: single(s, images, a.batch, pre)),
        ("Ray, 1 actor", lambda: through_ray(art, images, 1, None)),
        ("Ray, 2 actors", lambda: through_ray(art, images, 2, None)),
        ("Ray, 2 actors x 1 thread", lambda: through_ray(art, images, 2, 1)),
    ]
    runs: dict[str, list[float]] = {name: [] for name, _ in configs}
    for r in range(a.repeats):
        for name, f in configs:
            v = f()
            runs[name].append(v)
            print(f"repeat {r}: {name}: {v:.1f} images/s", flush=True)
    over = []
    for r in range(a.repeats):
        py, cli = overhead(a.tiny, a.kiln, a.calls, a.tmp)
        over.append((py, cli))
        print(f"repeat {r}: tiny model batch 1: Python Session.run {py * 1e3:.1f} us, kiln bench {cli * 1e3:.1f} us, overhead {(py - cli) * 1e3:.1f} us", flush=True)
    print(json.dumps({"images_per_s": runs, "overhead_ms": over, "model": s.model}))
    ray.shutdown()


if __name__ == "__main__":
    main()
