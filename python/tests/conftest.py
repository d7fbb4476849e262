"""Helpers for the package's tests: the repository's fixtures, safetensors files read and
written with NumPy alone, and the `kiln` CLI built by `cargo test` (target/debug/kiln)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
_ST = {"F32": np.float32, "F16": np.float16, "I32": np.int32, "I64": np.int64, "U8": np.uint8, "BOOL": np.bool_}
_ST_NAMES = {np.dtype(v): k for k, v in _ST.items()}


def read_st(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file's tensors (bf16 widened to float32)."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    body = raw[8 + n :]
    out = {}
    for name, h in header.items():
        if name == "__metadata__":
            continue
        a, b = h["data_offsets"]
        if h["dtype"] == "BF16":
            words = np.frombuffer(body[a:b], dtype=np.uint16).astype(np.uint32) << 16
            arr = words.view(np.float32)
        else:
            arr = np.frombuffer(body[a:b], dtype=_ST[h["dtype"]])
        out[name] = arr.reshape(h["shape"]).copy()
    return out


def write_st(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """Writes tensors as a safetensors file."""
    header, chunks, off = {}, [], 0
    for name, t in tensors.items():
        t = np.ascontiguousarray(t)
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + t.nbytes]}
        chunks.append(t.tobytes())
        off += t.nbytes
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(h)) + h + b"".join(chunks))


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want|, as the Rust golden tests measure."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-6))


def kiln_bin() -> Path:
    """The CLI: $KILN_BIN, else the debug build `cargo test` leaves."""
    p = Path(os.environ.get("KILN_BIN", ROOT / "target" / "debug" / "kiln"))
    if not p.is_file():
        pytest.skip(f"{p} is missing: build the CLI first (cargo build, or scripts/test.sh)")
    return p


def cli(*args: str, ok: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Runs the CLI (in `cwd`); with `ok`, fails the test when it fails."""
    r = subprocess.run([str(kiln_bin()), *map(str, args)], capture_output=True, text=True, cwd=cwd)
    if ok and r.returncode != 0:
        raise AssertionError(f"kiln {' '.join(map(str, args))}: {r.stderr}")
    return r


def cli_error(*args: str) -> str:
    """The message the CLI fails with (its stderr after `error: `)."""
    r = cli(*args, ok=False)
    assert r.returncode != 0, f"kiln {args} succeeded"
    line = [l for l in r.stderr.splitlines() if l.startswith("error: ")][-1]
    return line[len("error: ") :]
