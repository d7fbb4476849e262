"""kiln for Python: compile a big_vision-family checkpoint ahead of time, run it on NumPy
arrays and PyTorch tensors.

    import kiln
    art = kiln.compile("siglip-folder", batch=8, resolution=224)   # kiln compile
    art.save("siglip.kiln")
    s = kiln.load("siglip.kiln")                                    # or art.session()
    out = s.run({"pixel_values": pixels})                           # dict of numpy arrays

Everything runs in kiln's Rust runtime (the code paths of the `kiln` CLI); this module only
turns arrays into views of their memory and the outputs back into arrays. Errors are
`KilnError` (subclasses `InputError`, `ModelError`, `ArtifactError`, `BackendError`) with the
CLI's messages. `kiln.ray` runs an artifact as a Ray Data stage.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import numpy as np

from . import _kiln
from ._kiln import Artifact, ArtifactError, BackendError, InputError, KilnError, ModelError

__all__ = [
    "Artifact",
    "ArtifactError",
    "BackendError",
    "InputError",
    "KilnError",
    "ModelError",
    "Session",
    "TensorInfo",
    "compile",
    "load",
]
__version__ = _kiln.__version__

# NumPy dtype -> kiln dtype name. Anything else goes to kiln under its NumPy name and is
# refused there with the list of dtypes kiln runs.
_KILN_DTYPES = {
    np.dtype(np.float32): "f32",
    np.dtype(np.float16): "f16",
    np.dtype(np.int32): "i32",
    np.dtype(np.int64): "i64",
    np.dtype(np.uint8): "u8",
    np.dtype(np.bool_): "bool",
}
_NUMPY_DTYPES = {v: k for k, v in _KILN_DTYPES.items()}


class TensorInfo(NamedTuple):
    """One input or output of an entry: name, kiln dtype name, shape, and whether it is a
    persistent state the session keeps (a generation program's KV cache)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    state: bool


def _torch_array(x: Any) -> tuple[np.ndarray, str | None]:
    """A torch tensor as a NumPy array sharing its memory when it is on the CPU (a GPU tensor
    is copied to the host); bf16 is viewed as its raw 16-bit words."""
    import torch

    t = x.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy(), "bf16"
    return t.numpy(), None


def _array(name: str, x: Any) -> tuple[np.ndarray, str]:
    """`x` as a C-contiguous array (copied only when its layout needs it) and its kiln dtype."""
    kind = None
    if type(x).__module__.startswith("torch"):
        arr, kind = _torch_array(x)
    elif isinstance(x, np.ndarray):
        arr = x
    elif hasattr(x, "__dlpack__"):
        arr = np.from_dlpack(x)
    else:
        arr = np.asarray(x)
    if not arr.flags.c_contiguous or not arr.dtype.isnative:
        arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("="))
    if kind is None:
        kind = _KILN_DTYPES.get(arr.dtype, arr.dtype.name)
    return arr, kind


def _raw(inputs: Mapping[str, Any]) -> tuple[list[tuple], list[np.ndarray]]:
    """(name, dtype, shape, address, bytes) per input, and the arrays that must outlive the call."""
    if not isinstance(inputs, Mapping):
        raise TypeError(f"inputs must be a dict of name -> array, not {type(inputs).__name__}")
    raw, keep = [], []
    for name, x in inputs.items():
        arr, kind = _array(name, x)
        keep.append(arr)
        raw.append((str(name), kind, tuple(int(d) for d in arr.shape), arr.ctypes.data, arr.nbytes))
    return raw, keep


def _arrays(outs: list[tuple]) -> dict[str, np.ndarray]:
    return {name: np.frombuffer(buf, dtype=_NUMPY_DTYPES[dtype]).reshape(shape) for name, dtype, shape, buf in outs}


class Session:
    """A compiled program loaded with its weights; run it many times.

    Thread safety: one session may be shared by threads; its runs take its lock and run one at
    a time (a session owns one memory arena). For runs in parallel, load one session per
    thread. The GIL is released while a run computes.
    """

    def __init__(self, native: _kiln.Session):
        self._s = native

    def run(self, inputs: Mapping[str, Any], entry: str = "forward") -> dict[str, np.ndarray]:
        """Runs `entry` on named inputs (NumPy arrays, PyTorch tensors, anything with
        `__dlpack__` or `__array__`); returns its outputs as NumPy arrays.

        An input already of the entry's dtype and shape and C-contiguous is read in place (no
        copy); otherwise it is completed as `kiln run` completes it (a text model's integer
        inputs converted, `attention_mask` / `position_ids` / `token_type_ids` filled, floats
        cast to the entry's dtype) or refused with the CLI's message (`InputError`). bf16
        outputs come back as float32.
        """
        raw, keep = _raw(inputs)
        outs = self._s.run_raw(raw, entry)
        del keep
        return _arrays(outs)

    def generate(
        self,
        input_ids: Any = None,
        attention_mask: Any = None,
        pixel_values: Any = None,
        *,
        prompt: str | None = None,
        image: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float | None = None,
        seed: int = 0,
        draw: str | None = None,
        seg_decoder: str | None = None,
        num_beams: int = 1,
        num_return_sequences: int = 1,
        length_penalty: float = 1.0,
        early_stopping: bool | str = False,
        min_new_tokens: int = 0,
    ) -> dict[str, Any]:
        """`kiln generate` on a generation program (`compile(..., generate=True)`).

        With `input_ids [B, L]` (and `attention_mask` with left padding, and `pixel_values`
        for PaliGemma): returns `{"sequences": int64 [R, L + n], "step_logits": float32
        [R, n, V], "logprobs": float32 [R, n]}` (each chosen token's log-softmax under the
        model), greedy unless `temperature > 0` (then transformers' filters and kiln's
        seeded generator, as `--temperature/--top-k/--top-p/--seed`). R is B times the
        program's `rows_per_input` (`compile(..., rows_per_input=N)`: N samples per input from
        one prefill, rows `i*N + j`, as `--num-samples N`). With `num_beams > 1` (a program
        compiled with `rows_per_input=num_beams`): transformers' beam search, returning
        `{"sequences": [B * num_return_sequences, L + n], "sequences_scores"}`.

        With `prompt` (and `image`, a JPEG or PNG path, for PaliGemma; batch-1 programs):
        tokenizes and preprocesses as transformers' processor does and returns `{"text",
        "input_ids", "new_ids", "detections"}`, each detection `(label, [ymin, xmin, ymax,
        xmax] in [0, 1], [x0, y0, x1, y1] in pixels, mask codes or None)`. `draw` writes the
        image with the boxes; `seg_decoder` decodes `<seg>` masks (`--draw`, `--seg-decoder`).
        `max_new_tokens` defaults to what the program was compiled for.
        """
        sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        if prompt is not None:
            if input_ids is not None:
                raise TypeError("give input_ids or prompt, not both")
            img = None if image is None else str(image)
            return self._s.generate_prompt(
                prompt, img, draw=None if draw is None else str(draw), seg_decoder=seg_decoder, **sampling
            )
        if input_ids is None:
            raise TypeError("generate needs input_ids (or prompt=...)")
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}
        raw, keep = _raw({k: v for k, v in given.items() if v is not None})
        beams = None
        if num_beams > 1:
            stop = {True: "true", False: "false"}.get(early_stopping, early_stopping)
            beams = (num_beams, num_return_sequences, float(length_penalty), str(stop), min_new_tokens)
        outs = self._s.generate_raw(raw, beams=beams, **sampling)
        del keep
        return _arrays(outs)

    def _infos(self, entry: str | None, side: str) -> list[TensorInfo]:
        entries = self._s.entries
        if entry is None:
            entry = "forward" if "forward" in entries else next(iter(entries))
        if entry not in entries:
            raise InputError(f"no entry '{entry}' in this program (it has: {', '.join(entries)})")
        return [TensorInfo(d["name"], d["dtype"], tuple(d["shape"]), d["state"]) for d in entries[entry][side]]

    @property
    def inputs(self) -> list[TensorInfo]:
        """The inputs of the `forward` entry (else the first entry): name, dtype, shape, state."""
        return self._infos(None, "inputs")

    @property
    def outputs(self) -> list[TensorInfo]:
        """The outputs of the `forward` entry (else the first entry)."""
        return self._infos(None, "outputs")

    def entry_inputs(self, entry: str) -> list[TensorInfo]:
        """The inputs of `entry`."""
        return self._infos(entry, "inputs")

    def entry_outputs(self, entry: str) -> list[TensorInfo]:
        """The outputs of `entry`."""
        return self._infos(entry, "outputs")

    @property
    def entries(self) -> list[str]:
        """The program's entries (`forward`; `prefill`, `decode`; `inverse`)."""
        return list(self._s.entries)

    @property
    def model(self) -> str:
        """The model the program computes."""
        return self._s.model

    @property
    def backend(self) -> str:
        """The backend it runs on."""
        return self._s.backend

    @property
    def source(self) -> str:
        """The checkpoint folder it was compiled from."""
        return self._s.source

    def __repr__(self) -> str:
        return f"<kiln.Session {self.model} [backend {self.backend}] entries {self.entries}>"


def compile(
    folder: str,
    *,
    batch: int | None = None,
    resolution: int | None = None,
    dtype: str = "f32",
    backend: str = "cpu",
    device: str | None = None,
    seq_len: int | None = None,
    generate: bool = False,
    max_new_tokens: int | None = None,
    moe_capacity: float | None = None,
    moe_bpr: bool | None = None,
    arch: str = "sm_90a",
    rows_per_input: int = 1,
) -> Artifact:
    """`kiln compile <folder>`: the program for one profile (batch, resolution, dtype, backend;
    `seq_len` for a text model's forward), or with `generate=True` a text model's generation
    program (`seq_len` is the prompt bucket, `max_new_tokens` sizes the KV cache;
    `rows_per_input` decode rows per prompt: samples or beams, from one prefill). The GIL is
    released while it compiles. Save it with `.save(path)`; load it with `.session()`."""
    return _kiln.compile(
        str(folder),
        batch=batch,
        resolution=resolution,
        dtype=dtype,
        backend=backend,
        device=device,
        seq_len=seq_len,
        generate=generate,
        max_new_tokens=max_new_tokens,
        moe_capacity=moe_capacity,
        moe_bpr=moe_bpr,
        arch=arch,
        rows_per_input=rows_per_input,
    )


def load(
    path: str,
    *,
    weights: str | None = None,
    backend: str | None = None,
    device: str | None = None,
    cuda_gemv: str = "auto",
    **profile: Any,
) -> Session:
    """Loads a `.kiln` artifact (its weights from the folder it was compiled from, or
    `weights`), or compiles a checkpoint folder first with `profile` (the keyword arguments of
    `compile`) on `backend` / `device` (default cpu)."""
    native = _kiln.load(
        str(path), weights=None if weights is None else str(weights), backend=backend, device=device, cuda_gemv=cuda_gemv, **profile
    )
    return Session(native)


def _session(artifact: Artifact, weights: str | None = None, *, cuda_gemv: str = "auto") -> Session:
    """Loads the artifact into a session (weights default to the folder it was compiled from)."""
    return Session(artifact.open_session(None if weights is None else str(weights), cuda_gemv=cuda_gemv))


Artifact.session = _session  # type: ignore[attr-defined]
