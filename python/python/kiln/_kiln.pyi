"""Type stubs of the native module `kiln._kiln` (python/src). Use the wrappers in `kiln`."""

from typing import Any

__version__: str

class KilnError(Exception): ...
class InputError(KilnError): ...
class ModelError(KilnError): ...
class ArtifactError(KilnError): ...
class BackendError(KilnError): ...

RawInput = tuple[str, str, tuple[int, ...], int, int]
RawOutput = tuple[str, str, list[int], bytearray]

class Artifact:
    model: str
    backend: str
    source: str
    entries: list[str]
    signature: dict[str, dict[str, list[dict[str, Any]]]]
    def save(self, path: str) -> None: ...
    @classmethod
    def load_file(cls, path: str) -> Artifact: ...
    def to_bytes(self) -> bytes: ...
    @classmethod
    def from_bytes(cls, data: bytes, name: str = "<bytes>") -> Artifact: ...
    def open_session(self, weights: str | None = None, *, cuda_gemv: str = "auto") -> Session: ...

class Session:
    model: str
    backend: str
    source: str
    is_generation: bool
    entries: dict[str, dict[str, list[dict[str, Any]]]]
    def run_raw(self, inputs: list[RawInput], entry: str = "forward") -> list[RawOutput]: ...
    def generate_raw(
        self,
        inputs: list[RawInput],
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float | None = None,
        seed: int = 0,
        beams: tuple[int, int, float, str, int] | None = None,
    ) -> list[RawOutput]: ...
    def generate_prompt(
        self,
        prompt: str,
        image: str | None = None,
        *,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float | None = None,
        seed: int = 0,
        draw: str | None = None,
        seg_decoder: str | None = None,
    ) -> dict[str, Any]: ...

def compile(folder: str, **options: Any) -> Artifact: ...
def load(path: str, **options: Any) -> Session: ...
