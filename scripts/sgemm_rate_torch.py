"""PyTorch's (MKL) f32 GEMM rate per CPU-second on the shapes of
`cargo run --release -p kiln-kernels --example sgemm_rate`: CPU time, not wall time, so the
figure can be read on a shared machine. Usage: python scripts/sgemm_rate_torch.py [threads]"""
import sys
import time

import torch

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
torch.set_num_threads(threads)
shapes = [(256, 1152, 3456), (256, 1152, 1152), (256, 1152, 4304), (256, 4304, 1152), (1024, 1152, 4304)]
print(f"{'m':>6} {'k':>6} {'n':>6} {'reps':>10} {'GFLOP/cpu-s':>14} {'GFLOP/s wall':>14}")
tf = tt = 0.0
with torch.inference_mode():
    for m, k, n in shapes:
        a = torch.randn(m, k)
        w = torch.randn(n, k)  # a Linear weight, used transposed as nn.Linear does
        flops = 2.0 * m * k * n
        reps = max(3, int(20e9 / flops))
        torch.nn.functional.linear(a, w)
        t0, w0 = time.process_time(), time.perf_counter()
        for _ in range(reps):
            torch.nn.functional.linear(a, w)
        dt, wall = time.process_time() - t0, time.perf_counter() - w0
        tf += flops * reps
        tt += dt
        print(f"{m:>6} {k:>6} {n:>6} {reps:>10} {flops * reps / dt * 1e-9:>14.1f} {flops * reps / wall * 1e-9:>14.1f}")
print(f"all shapes: {tf / tt * 1e-9:.1f} GFLOP per CPU-second ({threads} threads)")
