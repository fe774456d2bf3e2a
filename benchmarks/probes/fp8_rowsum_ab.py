"""FP8 row sums as additions (rowsum_mma=False) against the product (True, the default), interleaved.

    python benchmarks/probes/fp8_rowsum_ab.py hunyuan720p wan14b-720p      # H200; from the repository root

The Gluon FP8 attend kernel alone at sparsity 0.9 on the shape's random inputs: the two outputs' relative
difference, then three interleaved rounds of each, tile-major and stored in place. docs/design.md ("FP8
attention", "Attend kernel") quotes its figures."""
import sys
from dataclasses import replace

import torch
import triton

sys.path.insert(0, "benchmarks")
from _shapes import shape  # noqa: E402

from draftopt.kernels import draft_map, permuted_key_bias, select_blocks, tile_pool  # noqa: E402
from draftopt.kernels.geometry import permuted_source_index  # noqa: E402
from draftopt.kernels.gluon import attention as A  # noqa: E402
from draftopt.kernels.triton.quantize import fp8_operands_triton  # noqa: E402

ADDITIONS, PRODUCT = (replace(A.DEFAULT_FP8_TUNING, rowsum_mma=rs) for rs in (False, True))
torch.manual_seed(0)
for sname in sys.argv[1:]:
    heads, g = shape(sname)
    q, k, v = (torch.randn(1, heads, g.seq_len, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    kv_idx, kv_cnt = select_blocks(draft_map(tile_pool(q, g), tile_pool(k, g), 128 ** -0.5), 0.9, "percentile")
    bias = permuted_key_bias(None, 1, heads, g, q.device)
    ops = fp8_operands_triton(q, k, v, permuted_source_index(g, q.device), g.block)
    geo = g if A.reads_in_place(g, 1) else None
    fns = {name: (lambda t=t, o=o: A.attend_sm90_fp8(*ops, kv_idx, kv_cnt, bias, 128 ** -0.5, g.n_tiles,
                                                     g.n_text_blocks, False, q.dtype, t, A.edge_grid(g, False),
                                                     out_geom=o))
           for name, t, o in (("additions", ADDITIONS, None), ("product", PRODUCT, None),
                              ("additions in place", ADDITIONS, geo), ("product in place", PRODUCT, geo))}
    a, b = (f().float() for f in list(fns.values())[:2])
    print(f"{sname}: product vs additions rel err {((b - a).norm() / a.norm()).item():.2e}", flush=True)
    times = {n: [] for n in fns}
    for _ in range(3):
        for n, f in fns.items():
            times[n].append(triton.testing.do_bench(f, warmup=10, rep=80, return_mode="median"))
    for n, ts in times.items():
        ts = sorted(ts)
        print(f"{sname} 0.9 fp8 attend {n}: median {ts[1]:.2f} ms (rounds {ts[0]:.2f}-{ts[2]:.2f})", flush=True)
