"""One launch of the Gluon attend kernel (bf16 tile-major, or FP8) at a real shape, for ncu to read.

    ncu --clock-control none -k regex:_attend_sm90 --launch-skip 2 --launch-count 1 \
        --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis \
        python3 benchmarks/probes/profile_attend.py --mode fp8 [--rowsum]

Launches 3 times (2 warm-ups): ncu reads the stall reasons of the softmax (MUFU, barriers, long scoreboard;
docs/design.md, "Where the time goes"). ``--rowsum``: P's row sums as a product (Sm90Tuning.rowsum_mma); without it, additions."""
import argparse
import sys
from dataclasses import replace

import torch

sys.path.insert(0, "benchmarks")
from _shapes import shape  # noqa: E402

from draftopt.kernels import draft_map, permute_tiles, permuted_key_bias, select_blocks, tile_pool  # noqa: E402
from draftopt.kernels.geometry import permuted_source_index  # noqa: E402
from draftopt.kernels.gluon import attention as A  # noqa: E402
from draftopt.kernels.ops.quantize import fp8_operands  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--shape", default="hunyuan720p")
ap.add_argument("--mode", choices=["bf16", "fp8", "in-place"], default="fp8")
ap.add_argument("--rowsum", action="store_true")
args = ap.parse_args()
heads, g = shape(args.shape)
q, k, v = (torch.randn(1, heads, g.seq_len, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
scale = 128 ** -0.5
kv_idx, kv_cnt = select_blocks(draft_map(tile_pool(q, g), tile_pool(k, g), scale), 0.9, "percentile")
bias = permuted_key_bias(None, 1, heads, g, q.device)
edges = A.edge_grid(g, False)
if args.mode == "fp8":
    ops = fp8_operands(q, k, v, permuted_source_index(g, q.device), g.block)
    t = replace(A.DEFAULT_FP8_TUNING, rowsum_mma=args.rowsum)
    run = lambda: A.attend_sm90_fp8(*ops, kv_idx, kv_cnt, bias, scale, g.n_tiles, g.n_text_blocks, False,  # noqa
                                    q.dtype, t, edges)
elif args.mode == "bf16":
    qp, kp, vp = (permute_tiles(x, g) for x in (q, k, v))
    t = replace(A.DEFAULT_TUNING, rowsum_mma=args.rowsum)
    run = lambda: A.attend_sm90(qp, kp, vp, kv_idx, kv_cnt, bias, scale, g.n_tiles, g.n_text_blocks, False,  # noqa
                                t, edges)
else:
    t = replace(A.DEFAULT_TUNING, rowsum_mma=args.rowsum)
    run = lambda: A.attend_sm90_in_place(q, k, v, kv_idx, kv_cnt, bias, scale, g, False, t)  # noqa
for _ in range(3):
    run()
torch.cuda.synchronize()
print("done", args)
