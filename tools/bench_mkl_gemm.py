#!/usr/bin/env python3
"""PyTorch's f32 matrix product (MKL on x86) on the shapes `ip2p bench --only gemm` measures:
one JSON line per shape, GFLOP/s of the median of `--reps` runs after a warm-up.

    /tmp/ref/bin/python tools/bench_mkl_gemm.py --threads 2
"""
import argparse
import json
import time

import torch

# (m, k, n): the square sizes, then the text encoder's and the UNet's small-row products.
SHAPES = [(1024, 1024, 1024), (2048, 2048, 2048), (4096, 4096, 4096),
          (154, 768, 3072), (154, 3072, 768), (154, 768, 768), (48, 1280, 1280)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    for m, k, n in SHAPES:
        x = torch.randn(m, k)
        w = torch.randn(k, n)
        out = torch.empty(m, n)
        inner = max(1, int(2e9 // (2 * m * k * n)))
        torch.matmul(x, w, out=out)
        times = []
        for _ in range(a.reps):
            t = time.perf_counter()
            for _ in range(inner):
                torch.matmul(x, w, out=out)
            times.append((time.perf_counter() - t) / inner)
        s = sorted(times)[len(times) // 2]
        print(json.dumps({"component": "sgemm_mkl", "m": m, "k": k, "n": n, "s": s,
                          "gflops": 2 * m * k * n / s / 1e9,
                          "blas": torch.backends.mkl.is_available() and "mkl" or "other",
                          "torch": torch.__version__}), flush=True)


if __name__ == "__main__":
    main()
