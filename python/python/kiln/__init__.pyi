"""Type stubs of `kiln` (python/python/kiln/__init__.py has the docstrings)."""

from os import PathLike
from typing import Any, Mapping, NamedTuple

import numpy as np

from ._kiln import ArtifactError as ArtifactError
from ._kiln import BackendError as BackendError
from ._kiln import InputError as InputError
from ._kiln import KilnError as KilnError
from ._kiln import ModelError as ModelError

__version__: str
_Path = str | PathLike[str]

class TensorInfo(NamedTuple):
    name: str
    dtype: str
    shape: tuple[int, ...]
    state: bool

class Artifact:
    """A compiled program (`kiln compile`); its weights stay in the checkpoint folder."""

    model: str
    backend: str
    source: str
    entries: list[str]
    signature: dict[str, dict[str, list[dict[str, Any]]]]
    def save(self, path: _Path) -> None: ...
    @classmethod
    def load_file(cls, path: _Path) -> Artifact: ...
    def to_bytes(self) -> bytes: ...
    @classmethod
    def from_bytes(cls, data: bytes, name: str = "<bytes>") -> Artifact: ...
    def session(self, weights: _Path | None = None, *, cuda_gemv: str = "auto") -> Session: ...

class Session:
    """A program loaded with its weights. Runs of one session are serial (its lock); the GIL
    is released while one computes."""

    def run(self, inputs: Mapping[str, Any], entry: str = "forward") -> dict[str, np.ndarray]: ...
    def generate(
        self,
        input_ids: Any = None,
        attention_mask: Any = None,
        pixel_values: Any = None,
        *,
        prompt: str | None = None,
        image: _Path | None = None,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float | None = None,
        seed: int = 0,
        draw: _Path | None = None,
        seg_decoder: _Path | None = None,
        num_beams: int = 1,
        num_return_sequences: int = 1,
        length_penalty: float = 1.0,
        early_stopping: bool | str = False,
        min_new_tokens: int = 0,
    ) -> dict[str, Any]: ...
    @property
    def inputs(self) -> list[TensorInfo]: ...
    @property
    def outputs(self) -> list[TensorInfo]: ...
    def entry_inputs(self, entry: str) -> list[TensorInfo]: ...
    def entry_outputs(self, entry: str) -> list[TensorInfo]: ...
    @property
    def entries(self) -> list[str]: ...
    @property
    def model(self) -> str: ...
    @property
    def backend(self) -> str: ...
    @property
    def source(self) -> str: ...

def compile(
    folder: _Path,
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
) -> Artifact: ...
def load(
    path: _Path,
    *,
    weights: _Path | None = None,
    backend: str | None = None,
    device: str | None = None,
    cuda_gemv: str = "auto",
    batch: int | None = None,
    resolution: int | None = None,
    dtype: str = "f32",
    seq_len: int | None = None,
    generate: bool = False,
    max_new_tokens: int | None = None,
    moe_capacity: float | None = None,
    moe_bpr: bool | None = None,
    arch: str = "sm_90a",
    rows_per_input: int = 1,
) -> Session: ...
