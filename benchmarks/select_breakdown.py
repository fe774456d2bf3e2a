"""Where the "percentile" selection spends its time (the stage the 1 ms pool + select target hinges on).

    python benchmarks/select_breakdown.py [--shape hunyuan720p] [--sparsity 0.9]

Times select_blocks as a whole, each step of its CUDA path (sample -> bracket,
bracket pass, radix levels, threshold + ties, compaction: CUDA-graph replays of
the steps so far, minus the previous) and the torch.topk path it replaced, on
one real-model draft map (median of triton.testing.do_bench); prints a table
last and writes JSON/CSV to $OUT (or .).
"""

import argparse

import torch
import triton
from tabulate import tabulate

from _results import save_table
from _timing import graphed
from _shapes import SHAPES, shape
from draftopt.kernels import draft_map, select_blocks, tile_pool
from draftopt.kernels.sparsity import keep_count, keep_percentile, with_diagonal
from draftopt.kernels.triton.compact import compact_triton
from draftopt.kernels.triton.radix_select import percentile_launches



def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="hunyuan720p", choices=list(SHAPES))
    ap.add_argument("--sparsity", type=float, default=0.9)
    args = ap.parse_args()
    heads, g = shape(args.shape)
    q, k = (torch.randn(1, heads, g.seq_len, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    P = draft_map(tile_pool(q, g), tile_pool(k, g), 128 ** -0.5)
    B, H, S, _ = P.shape
    flat = P.reshape(B, H, S * S)
    n_keep = keep_count(args.sparsity, S * S)
    top = flat.topk(n_keep, dim=-1, sorted=False).indices
    keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, top, True).reshape(B, H, S, S)
    keep_d = with_diagonal(keep)
    steps = {
        "select_blocks (all)": lambda: select_blocks(P, args.sparsity, "percentile"),
        "select_blocks (all), CUDA graph": graphed(lambda: select_blocks(P, args.sparsity, "percentile")),
        "topk path (all, replaced)": lambda: compact_triton(keep_percentile(P, args.sparsity), S),
        "topk path (all, replaced), CUDA graph": graphed(lambda: compact_triton(keep_percentile(P, args.sparsity), S)),
        "topk indices over S^2": lambda: flat.topk(n_keep, dim=-1, sorted=False),
        "scatter into bool": lambda: torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, top, True),
        "OR diagonal": lambda: with_diagonal(keep),
        "bool -> uint8 + compaction kernel": lambda: compact_triton(keep_d, S),
        "kthvalue over S^2 (alternative)": lambda: flat.kthvalue(S * S - n_keep + 1, dim=-1),
        "sort over S^2 (alternative)": lambda: flat.sort(dim=-1, descending=True),
    }
    bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")  # noqa: E731
    rows = [[name, round(bench(fn), 4)] for name, fn in steps.items()]
    new_steps, _, _ = percentile_launches(P.contiguous(), args.sparsity)
    before = 0.0
    for i, (name, _) in enumerate(new_steps):  # each step: graph of the steps up to it, minus the one before
        upto = bench(graphed(lambda i=i: [step() for _, step in new_steps[: i + 1]]))
        rows.append([f"new path: {name}", round(upto - before, 4)])
        before = upto
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                shape=args.shape, sparsity=args.sparsity, S=S, heads=H, keep_per_head=n_keep)
    save_table("select_breakdown", ["step", "ms"], rows, meta)
    print(f"{args.shape}: S={S}, {H} heads, keep {n_keep} of {S * S} per head; {meta['device']}, "
          f"torch {meta['torch']}")
    print(tabulate(rows, headers=["step", "ms"]))


if __name__ == "__main__":
    main()
