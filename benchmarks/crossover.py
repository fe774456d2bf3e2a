"""Where draft attention starts to beat dense attention: the MIN_TOKENS default.

    python benchmarks/crossover.py [--heads 12] [--sparsity 0.9]

bf16, D = 128, no text; dense is the faster of SDPA's cuDNN and flash backends.
Prints a table; the smallest token count where draftopt wins is MIN_TOKENS.
"""

import argparse

import torch
import torch.nn.functional as F
import triton
from tabulate import tabulate
from torch.nn.attention import SDPBackend, sdpa_kernel

from draftopt.kernels import draft_attention

GRIDS = [(1, 16, 32), (2, 16, 32), (4, 16, 32), (8, 16, 32), (8, 30, 52), (16, 30, 52)]


def best_dense(q, k, v):
    times = []
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        with sdpa_kernel([backend]):
            times.append(triton.testing.do_bench(lambda: F.scaled_dot_product_attention(q, k, v),
                                                 return_mode="median"))
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
        draft = triton.testing.do_bench(lambda: draft_attention(q, k, v, grid, sparsity=args.sparsity),
                                        return_mode="median")
        rows.append(["x".join(map(str, grid)), N, f"{dense:.3f}", f"{draft:.3f}", f"{dense / draft:.2f}x"])
    print(f"crossover: bf16, {args.heads} heads, D=128, sparsity {args.sparsity}, {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}, triton {triton.__version__}")
    print(tabulate(rows, headers=["grid", "tokens", "dense ms", "draftopt ms", "speedup"]))


if __name__ == "__main__":
    main()
