"""PyTorch's f32 matmul (MKL on CPU) on the GEMM shapes of benches/gemm.rs, on one thread and on all cores:
the anchor for the generated GEMM. Needs the environment benches/pytorch.sh sets up:

    PYTHONPATH=target/pytorch python3 benches/torch_matmul.py
"""

import os
import time

import torch


def median_seconds(f, reps=30):
    for _ in range(3):
        f()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2]


for threads in sorted({1, os.cpu_count() or 1}):
    torch.set_num_threads(threads)
    for m, k, n in [(1024, 512, 2048), (256, 512, 2048), (1024, 512, 4096), (1, 512, 2048)]:
        a, b = torch.randn(m, k), torch.randn(k, n)
        s = median_seconds(lambda: a @ b)
        print(f"{threads} thread(s) {m}x{k}x{n}: {s * 1e3:.3f} ms, {2 * m * k * n / s / 1e9:.1f} GFLOP/s")
