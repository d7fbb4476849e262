"""kiln on Ray Data: a compiled artifact as a `map_batches` stage over an actor pool.

The artifact is compiled once, on the driver, and put in Ray's object store; each actor of
the pool loads it into one session (one per GPU with `num_gpus=1`) and runs every batch it is
given through it. Ray Data streams the batches, restarts an actor that dies and retries its
batches (its defaults for actor pools), so a job survives a lost worker.

    import ray, kiln, kiln.ray
    art = kiln.compile("siglip-folder", batch=16, resolution=224)
    ds = ray.data.read_images("photos/", include_paths=True, size=(224, 224), mode="RGB")
    ds = kiln.ray.run(ds, art, inputs={"pixel_values": kiln.ray.siglip_pixels("image")},
                      outputs={"pooler_output": "embedding"}, keep=["path"], concurrency=2)
    ds.write_parquet("embeddings/")

Weights: each actor reads them from the folder the artifact was compiled from (or
`weights=`), so on a multi-node cluster that path must exist on every node (a shared file
system), or pass `ship_weights=True` to send the checkpoint's files through the object store.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

import kiln

__all__ = ["KilnPredictor", "PromptPredictor", "generate", "run", "siglip_pixels"]

Preprocess = Callable[[Mapping[str, np.ndarray]], np.ndarray]


def siglip_pixels(column: str = "image", mean: float = 0.5, std: float = 0.5) -> Preprocess:
    """SigLIP's preprocessing of decoded images: uint8 `[n, H, W, 3]` (as
    `ray.data.read_images` gives them, already resized) to `pixel_values` `[n, 3, H, W]` float32,
    `(x / 255 - mean) / std` (transformers' SiglipImageProcessor with its defaults)."""

    def pre(batch: Mapping[str, np.ndarray]) -> np.ndarray:
        x = np.stack(list(batch[column])) if batch[column].dtype == object else batch[column]
        x = x.astype(np.float32) * np.float32(1 / 255)
        return np.ascontiguousarray(((x - mean) / std).transpose(0, 3, 1, 2), dtype=np.float32)

    return pre


def _resolve(obj: Any) -> Any:
    import ray

    return ray.get(obj) if isinstance(obj, ray.ObjectRef) else obj


def _weights_folder(shipped: Mapping[str, bytes] | None, weights: str | None) -> str | None:
    """Writes shipped checkpoint files into a local folder once per process."""
    if shipped is None:
        return weights
    d = Path(tempfile.mkdtemp(prefix="kiln-weights-"))
    for name, data in shipped.items():
        (d / name).write_bytes(data)
    return str(d)


class KilnPredictor:
    """A Ray Data callable class: one session, batches in, outputs added as columns.

    `inputs` maps each of the entry's inputs to a column name or to a function of the batch
    (`siglip_pixels`). Rows are run in chunks of the artifact's batch; the last chunk is padded
    with copies of its last row, whose outputs are dropped. `outputs` maps output names to
    column names (default: every output under its own name); `keep` lists the input columns
    passed through (an id or path, so every result can be matched to its row).
    """

    def __init__(
        self,
        artifact: Any,
        inputs: Mapping[str, str | Preprocess],
        outputs: Mapping[str, str] | None = None,
        keep: Sequence[str] = (),
        entry: str = "forward",
        weights: str | None = None,
        shipped: Any = None,
    ):
        art = _resolve(artifact)
        self.session = art.session(_weights_folder(_resolve(shipped), weights))
        self.inputs, self.outputs, self.keep, self.entry = dict(inputs), outputs, list(keep), entry
        infos = {i.name: i for i in self.session.entry_inputs(entry)}
        self.batch = next(iter(infos.values())).shape[0]

    def _arrays(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for name, src in self.inputs.items():
            x = src(batch) if callable(src) else batch[src]
            out[name] = np.stack(list(x)) if x.dtype == object else x
        return out

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = self._arrays(batch)
        n = len(next(iter(arrays.values())))
        results: dict[str, list[np.ndarray]] = {}
        for start in range(0, n, self.batch):
            rows = min(self.batch, n - start)
            chunk = {}
            for k, x in arrays.items():
                part = x[start : start + rows]
                if rows < self.batch:
                    part = np.concatenate([part, np.repeat(part[-1:], self.batch - rows, axis=0)])
                chunk[k] = part
            for k, y in self.session.run(chunk, self.entry).items():
                results.setdefault(k, []).append(y[:rows])
        names = self.outputs or {k: k for k in results}
        out = {col: np.concatenate(results[name]) for name, col in names.items()}
        for k in self.keep:
            out[k] = batch[k]
        return out


class PromptPredictor:
    """A Ray Data callable class over a generation program compiled for batch 1: for each row,
    `Session.generate(prompt=..., image=row[image_column])` (PaliGemma's `kiln generate
    --prompt --image`); adds `text` and `boxes` (one `label ymin xmin ymax xmax` line per
    detection, normalised coordinates) and keeps `keep`."""

    def __init__(
        self,
        artifact: Any,
        prompt: str,
        image_column: str = "path",
        keep: Sequence[str] = ("path",),
        max_new_tokens: int | None = None,
    ):
        self.session = _resolve(artifact).session()
        self.prompt, self.image_column, self.keep, self.max_new = prompt, image_column, list(keep), max_new_tokens

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts, boxes = [], []
        for img in batch[self.image_column]:
            r = self.session.generate(prompt=self.prompt, image=str(img), max_new_tokens=self.max_new)
            texts.append(r["text"])
            boxes.append("\n".join(f"{d[0]} " + " ".join(f"{v:.4f}" for v in d[1]) for d in r["detections"]))
        out = {"text": np.array(texts, dtype=object), "boxes": np.array(boxes, dtype=object)}
        for k in self.keep:
            out[k] = batch[k]
        return out


def _ship(art: kiln.Artifact) -> Any:
    """The checkpoint folder's files (not its subfolders) in the object store."""
    import ray

    folder = Path(art.source)
    return ray.put({p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()})


def run(
    ds: Any,
    artifact: kiln.Artifact,
    *,
    inputs: Mapping[str, str | Preprocess],
    outputs: Mapping[str, str] | None = None,
    keep: Sequence[str] = (),
    entry: str = "forward",
    concurrency: int | tuple[int, int] = 1,
    num_gpus: float = 0,
    num_cpus: float | None = None,
    batch_size: int | None = None,
    weights: str | None = None,
    ship_weights: bool = False,
    **map_batches_args: Any,
) -> Any:
    """`ds.map_batches` with a pool of `concurrency` actors (a number, or (min, max) to
    autoscale), each holding one session of `artifact`; `num_gpus` / `num_cpus` are each
    actor's resources (`num_gpus=1`: one session per GPU; compile with `backend="cuda"`). A CPU
    actor holds `num_cpus` (default 1, Ray Data's) while it lives: leave the cluster a CPU for
    the tasks that read the data, or the stage waits for one forever.
    `batch_size` defaults to the artifact's batch. Other keyword arguments go to
    `map_batches` as they are."""
    import ray

    ref = ray.put(artifact)
    shipped = _ship(artifact) if ship_weights else None
    if batch_size is None:
        batch_size = _artifact_batch(artifact, entry)
    resources: dict[str, Any] = {"num_gpus": num_gpus}
    if num_cpus is not None:
        resources["num_cpus"] = num_cpus
    return ds.map_batches(
        KilnPredictor,
        fn_constructor_kwargs=dict(
            artifact=ref, inputs=inputs, outputs=outputs, keep=keep, entry=entry, weights=weights, shipped=shipped
        ),
        batch_size=batch_size,
        batch_format="numpy",
        concurrency=concurrency,
        **resources,
        **map_batches_args,
    )


def generate(
    ds: Any,
    artifact: kiln.Artifact,
    *,
    prompt: str,
    image_column: str = "path",
    keep: Sequence[str] = ("path",),
    max_new_tokens: int | None = None,
    concurrency: int | tuple[int, int] = 1,
    num_gpus: float = 0,
    batch_size: int = 4,
    **map_batches_args: Any,
) -> Any:
    """PaliGemma over a dataset of image paths: `prompt` ("caption en", "detect cat ; dog")
    for every row, through a pool of actors each holding one session of `artifact` (a
    generation program compiled for batch 1: `kiln.compile(folder, generate=True, batch=1,
    seq_len=L, max_new_tokens=N)`). Adds the columns `text` and `boxes`."""
    import ray

    return ds.map_batches(
        PromptPredictor,
        fn_constructor_kwargs=dict(
            artifact=ray.put(artifact), prompt=prompt, image_column=image_column, keep=keep, max_new_tokens=max_new_tokens
        ),
        batch_size=batch_size,
        batch_format="numpy",
        concurrency=concurrency,
        num_gpus=num_gpus,
        **map_batches_args,
    )


def _artifact_batch(artifact: kiln.Artifact, entry: str) -> int:
    """The leading dimension of the entry's first input (the compiled batch)."""
    return int(artifact.signature[entry]["inputs"][0]["shape"][0])
