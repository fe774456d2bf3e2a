"""The FP8 stage 3-5 op storing its output in place against tile-major + unpermute, interleaved.

    python benchmarks/probes/fp8_store_ab.py hunyuan720p wan14b-720p      # H200; from the repository root

The tile-major side patches ``reads_in_place`` off in this process. Both input layouts ([B, heads, L, D]
contiguous; SDPA's transposed [B, L, heads, D] views); quantize alone too. docs/design.md ("FP8 attention")
quotes its figures."""
import sys

import torch
import triton

sys.path.insert(0, "benchmarks")
from _shapes import shape  # noqa: E402

from draftopt.kernels import draft_map, permuted_key_bias, select_blocks, tile_pool, tiled_attention  # noqa: E402
from draftopt.kernels.geometry import permuted_source_index  # noqa: E402
from draftopt.kernels.ops import attention as OA  # noqa: E402
from draftopt.kernels.triton.quantize import fp8_operands_triton  # noqa: E402

ROUNDS = 5
REAL = OA.reads_in_place
torch.manual_seed(0)


def inputs(heads, L, layout):
    if layout == "bhld":
        return [torch.randn(1, heads, L, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    return [torch.randn(1, L, heads, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3)]


for sname in sys.argv[1:]:
    heads, g = shape(sname)
    for layout in ("bhld", "blhd"):
        q, k, v = inputs(heads, g.seq_len, layout)
        scale = 128 ** -0.5
        kv_idx, kv_cnt = select_blocks(draft_map(tile_pool(q, g), tile_pool(k, g), scale), 0.9, "percentile")
        bias = permuted_key_bias(None, 1, heads, g, q.device)
        fn = lambda: tiled_attention(q, k, v, kv_idx, kv_cnt, g, key_bias=bias, scale=scale, precision="fp8")  # noqa
        src = permuted_source_index(g, q.device)
        quant = lambda: fp8_operands_triton(q, k, v, src, g.block)  # noqa
        outs, times = {}, {"tile-major + unpermute": [], "in place": [], "quantize": []}
        for mode in ("tile-major + unpermute", "in place"):
            OA.reads_in_place = REAL if mode == "in place" else (lambda geom, batch: False)
            outs[mode] = fn()
        OA.reads_in_place = REAL
        print(sname, layout, "bitwise equal:", torch.equal(*outs.values()), flush=True)
        for _ in range(ROUNDS):
            for mode in times:
                OA.reads_in_place = REAL if mode != "tile-major + unpermute" else (lambda geom, batch: False)
                f = quant if mode == "quantize" else fn
                times[mode].append(triton.testing.do_bench(f, warmup=10, rep=80, return_mode="median"))
        OA.reads_in_place = REAL
        for mode, ts in times.items():
            ts = sorted(ts)
            print(f"{sname} 0.9 {layout} fp8 {'stage 3-5, ' if mode != 'quantize' else ''}{mode}: "
                  f"median {ts[len(ts) // 2]:.2f} ms (rounds {ts[0]:.2f}-{ts[-1]:.2f})", flush=True)
