"""kiln.ray on a local Ray cluster the test starts: 64 generated images embedded by a tiny
SigLIP through a pool of 2 actors (2 worker processes), every image exactly once and each
embedding equal to single-process kiln's; then the same job with one worker killed mid-job,
which Ray restarts, and the output is still complete."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import kiln

ray = pytest.importorskip("ray")
import kiln.ray  # noqa: E402  (after the skip: it needs ray)

SIGLIP = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "siglip" / "vision_map"
N_IMAGES = 64


@pytest.fixture(scope="module")
def cluster():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Logical CPUs: two for the two actors, two for reading; the machine may have two cores.
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=256 << 20, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    # The test's predictor subclass travels by value (workers cannot import this file).
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(7)
    for i in range(N_IMAGES):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"img{i:03d}.png")
    return d


def reference(art: kiln.Artifact, folder: Path) -> dict[str, np.ndarray]:
    """Single-process kiln: each image through Session.run, in chunks of the compiled batch."""
    from PIL import Image

    s = art.session()
    paths = sorted(folder.glob("*.png"))
    pre = kiln.ray.siglip_pixels("image")
    out = {}
    for k in range(0, len(paths), 4):
        chunk = paths[k : k + 4]
        px = pre({"image": np.stack([np.asarray(Image.open(p).convert("RGB")) for p in chunk])})
        emb = s.run({"pixel_values": px})["pooler_output"]
        out.update({str(p): e for p, e in zip(chunk, emb)})
    return out


def embed(art, folder, predictor=kiln.ray.KilnPredictor, ship_weights=False, **extra):
    ds = ray.data.read_images(str(folder), include_paths=True, mode="RGB")
    inputs = {"pixel_values": kiln.ray.siglip_pixels("image")}
    if predictor is kiln.ray.KilnPredictor:
        ds = kiln.ray.run(
            ds, art, inputs=inputs, outputs={"pooler_output": "embedding"}, keep=["path"], concurrency=2, ship_weights=ship_weights
        )
    else:
        ref = ray.put(art)
        ds = ds.map_batches(
            predictor,
            fn_constructor_kwargs=dict(artifact=ref, inputs=inputs, outputs={"pooler_output": "embedding"}, keep=["path"], **extra),
            batch_size=4,
            batch_format="numpy",
            concurrency=2,
        )
    return ds.take_all()


def check_complete(rows, want):
    paths = [r["path"] for r in rows]
    assert len(paths) == N_IMAGES and len(set(paths)) == N_IMAGES, "every image exactly once"
    assert set(paths) == {p.lstrip("/") for p in want} or set(paths) == set(want)
    for r in rows:
        key = r["path"] if r["path"] in want else "/" + r["path"]
        np.testing.assert_array_equal(r["embedding"], want[key])


def test_embed_a_folder_through_two_actors(cluster, images):
    art = kiln.compile(SIGLIP, batch=4)
    want = reference(art, images)
    check_complete(embed(art, images), want)
    # The checkpoint's files through the object store (for nodes without the folder).
    check_complete(embed(art, images, ship_weights=True), want)


class SlowPredictor(kiln.ray.KilnPredictor):
    """The predictor, slowed down and logging its process and batches, so a test can kill it
    while the job runs."""

    def __init__(self, log_dir: str, **kw):
        super().__init__(**kw)
        self.log = Path(log_dir)
        (self.log / f"actor-{os.getpid()}").write_text("0")

    def __call__(self, batch):
        time.sleep(0.5)
        out = super().__call__(batch)
        f = self.log / f"actor-{os.getpid()}"
        f.write_text(str(int(f.read_text()) + 1))
        return out


def test_a_killed_worker_is_retried_and_the_output_is_complete(cluster, images, tmp_path):
    art = kiln.compile(SIGLIP, batch=4)
    want = reference(art, images)
    killed: list[int] = []

    def killer():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            for f in tmp_path.glob("actor-*"):
                if f.read_text().strip() not in ("", "0"):
                    pid = int(f.name.split("-")[1])
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return
            time.sleep(0.05)

    t = threading.Thread(target=killer)
    t.start()
    rows = embed(art, images, predictor=SlowPredictor, log_dir=str(tmp_path))
    t.join()
    assert killed, "no worker was killed"
    started = [f.name for f in tmp_path.glob("actor-*")]
    assert len(started) >= 3, f"Ray did not start a new worker after the kill: {started}"
    check_complete(rows, want)


def test_paligemma_prompts_over_a_folder(cluster):
    """kiln.ray.generate: PaliGemma's answer for every image, as a single session gives it."""
    fixtures = SIGLIP.parents[1] / "tokenizer"
    art = kiln.compile(fixtures / "paligemma", generate=True, batch=1, seq_len=24, max_new_tokens=10)
    paths = sorted(str(p) for p in (fixtures / "images").iterdir())
    s = art.session()
    want = {p: s.generate(prompt="detect cat ; dog", image=p)["text"] for p in paths}
    ds = ray.data.from_items([{"path": p} for p in paths])
    rows = kiln.ray.generate(ds, art, prompt="detect cat ; dog", concurrency=2, batch_size=1).take_all()
    assert sorted(r["path"] for r in rows) == paths
    assert {r["path"]: r["text"] for r in rows} == want
