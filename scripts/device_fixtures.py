#!/usr/bin/env python3
"""Fixtures end to end on `--backend cuda` (part of scripts/device_cuda.sh; GPU machine).

    device_fixtures.py KILN_BIN DIST_DIR OUT_DIR

For every fixture folder under tests/fixtures/{siglip,gemma} (config.json, inputs.safetensors,
reference.safetensors from PyTorch): runs `kiln run` with --backend cuda in f32 and bf16 (the
ahead-of-time artifact DIST_DIR/<name>.kiln when `package` made one, loaded with the folder's
weights), and compares every reference output present by normalised max error (f32: 1e-3,
bf16: 5e-2). Writes OUT_DIR/fixtures.jsonl and exits 1 on any failure.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file


def main():
    kiln, dist, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    rows, bad = [], 0
    for folder in sorted(Path("tests/fixtures/siglip").glob("*/")) + sorted(Path("tests/fixtures/gemma").glob("*/")):
        if not (folder / "reference.safetensors").exists():
            continue
        ref = load_file(str(folder / "reference.safetensors"))
        for dtype, tol in (("f32", 1e-3), ("bf16", 5e-2)):
            res = out / f"fixture_{folder.name}_{dtype}.safetensors"
            art = dist / f"{folder.name}.kiln"
            model = [str(art), "--weights", str(folder)] if dtype == "f32" and art.exists() else [str(folder), "--dtype", dtype]
            cmd = [kiln, "run", *model, "--backend", "cuda", "--inputs", str(folder / "inputs.safetensors"), "--out", str(res)]
            p = subprocess.run(cmd, capture_output=True, text=True)
            row = {"fixture": folder.name, "dtype": dtype}
            if p.returncode != 0:
                row["error"] = (p.stderr or p.stdout).strip()[-400:]
                # Again one step at a time, so that a device fault names its step and kernel.
                d = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "KILN_CUDA_DEBUG": "1"})
                row["debug_error"] = (d.stderr or d.stdout).strip()[-400:]
                bad += 1
            else:
                got = load_file(str(res))
                errs = {}
                for name, want in ref.items():
                    if name not in got:
                        continue
                    g, w = got[name].astype(np.float64), want.astype(np.float64)
                    if g.shape != w.shape:
                        errs[name] = f"shape {g.shape} vs {w.shape}"
                        continue
                    errs[name] = float(np.max(np.abs(g - w)) / max(np.max(np.abs(w)), 1e-6))
                row["errors"] = errs
                ok = errs and all(isinstance(e, float) and e < tol for e in errs.values())
                row["ok"] = bool(ok)
                bad += 0 if ok else 1
            rows.append(row)
            print(json.dumps(row))
    with open(out / "fixtures.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"fixtures: {len(rows) - bad} of {len(rows)} passed")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
