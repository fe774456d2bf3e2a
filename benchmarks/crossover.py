"""Where draft attention starts to beat dense attention: the MIN_TOKENS default.

    python benchmarks/crossover.py [--heads 12] [--sparsity 0.9]

bf16, D = 128, no text; dense is the faster of SDPA's cuDNN and flash backends.
Both sides are timed as CUDA-graph replays, as a compiled model runs them
(mode="reduce-overhead"): eager timings of the five-stage pipeline measure
Python launch overhead (about 3 ms), not the GPU.
Prints a table; the smallest token count where draftopt wins is MIN_TOKENS.
"""

import argparse

import torch
import torch.nn.functional as F
import triton
from tabulate import tabulate

from _results import save_table
from torch.nn.attention import SDPBackend, sdpa_kernel

from _timing import graphed
from draftopt.kernels import draft_attention

GRIDS = [(1, 16, 32), (2, 16, 32), (4, 16, 32), (8, 16, 32), (8, 24, 32), (8, 32, 32), (8, 24, 48), (8, 30, 52), (16, 30, 52)]


def bench(fn):
    return triton.testing.do_bench(graphed(fn), return_mode="median")


def best_dense(q, k, v):
    times = []
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        with sdpa_kernel([backend]):
            times.append(bench(lambda: F.scaled_dot_product_attention(q, k, v)))
    return min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--sparsity", type=float, default=0.9)
    args = ap.parse_args()
    rows = []
    for grid in GRIDS:
        N = grid[0] * grid[1] * grid[2]
        q, k, v = (torch.randn(1, args.heads, N, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        dense = best_dense(q, k, v)
        draft = bench(lambda: draft_attention(q, k, v, grid, sparsity=args.sparsity))
        rows.append(["x".join(map(str, grid)), N, f"{dense:.3f}", f"{draft:.3f}", f"{dense / draft:.2f}x"])
    print(f"crossover: bf16, {args.heads} heads, D=128, sparsity {args.sparsity}, {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}, triton {triton.__version__}")
    headers = ["grid", "tokens", "dense ms", "draftopt ms", "speedup"]
    save_table("crossover", headers, rows, dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                                triton=triton.__version__, heads=args.heads, sparsity=args.sparsity))
    print(tabulate(rows, headers=headers))


if __name__ == "__main__":
    main()
