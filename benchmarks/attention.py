"""Op-level benchmark: draft attention against every dense and sparse alternative.

    python benchmarks/attention.py [--shapes hunyuan720p ...] [--sparsities 0.5 0.9] [--extra-tiles auto strips]
                                   [--out DIR]

bf16, D = 128, batch 1, at three real-model shapes. Rows per (shape, sparsity):

- dense SDPA with the cuDNN backend, and with the flash backend;
- dense SageAttention (INT8 q k^T, FP16 P V: the 8-bit dense peer of
  ``precision="fp8"``) where the ``sageattention`` package is installed (its
  Triton release is one 20 KB wheel to carry), else a row saying it is not;
- FlexAttention, compiled, given draftopt's block mask (selected tiles and text
  blocks as full blocks, tile-major q/k/v): the same sparse work, Inductor's kernel;
- draftopt total (all five stages as ``draft_attention`` runs them), in bf16 and
  with ``precision="fp8"`` (e4m3 q, k, P, V; where the plan runs FP8); for each
  of ``--extra-tiles`` that is another tiling than 8 x 16 here ("auto": raster
  strips at Wan2.1's 45 x 80 frames), its total and stages 3-5 as well; and each stage on its own:
  pool, draft map, select, permute, attend (tile-major: the Gluon kernel on
  sm_90, else the Triton kernel), unpermute; stages 3-5 as the
  one op the pass emits (``tiled_attention``: on sm_90 the Gluon kernel reading
  and writing tiles in place at batch 1, elsewhere the Triton kernel); and the
  Triton attention kernel on the same tiles, for comparison; FP8's own stages
  (quantize: tile-major e4m3 copies; attend: the Gluon kernel on them). draftopt rows are
  CUDA-graph replays, as a compiled model runs them (the selection is ~9 small
  launches: eager, Python would be most of its time).

Columns: median ms (triton.testing.do_bench), speedup over the best dense
backend, TFLOP/s on the computed blocks (attention rows only), peak memory one
call allocates beyond what is live before it, and for the total rows the
output's error (relative L2) against dense cuDNN SDPA and, for FP8, against the
bf16 sparse output of the same blocks. On these random inputs attention is
nearly uniform, so any sparsity's error against dense is large; the FP8 row at
sparsity 0 (error only, not timed) shows FP8's own error. Prints a tabulate
table last and writes JSON and CSV to --out.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
import triton
from tabulate import tabulate
from torch.nn.attention import SDPBackend, sdpa_kernel

from _results import save_table
from _shapes import SHAPES, shape
from _timing import graphed
from draftopt.kernels import (Geometry, block_mass, block_sparse_attention, draft_attention, draft_map, permute_tiles,
                              permuted_key_bias, plan, score_map, select_blocks, tile_layout, tile_moments, tile_pool,
                              tiled_attention, unpermute_tiles)
from draftopt.kernels.block_mask import indices_to_dense
from draftopt.kernels.geometry import permuted_source_index
from draftopt.kernels.gluon.attention import edge_grid
from draftopt.kernels.ops.quantize import fp8_operands
from draftopt.kernels.ops.select import select_blocks_guarded
from draftopt.kernels.sparsity import POLICIES
from draftopt.kernels.triton.attention import block_sparse_attention_triton


def timed(fn, graph: bool = False) -> tuple[float, float]:
    """(median ms, peak GiB that one call allocates beyond what is live before it).

    ``graph``: time CUDA-graph replays of ``fn`` (the GPU time, as a compiled model
    under CUDA graphs runs it, without Python launch costs); the memory is that of
    an eager call either way.
    """
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    mem = (torch.cuda.max_memory_allocated() - base) / 2**30
    ms = triton.testing.do_bench(graphed(fn) if graph else fn, warmup=25, rep=100, return_mode="median")
    return ms, mem


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error of x against ref (float64 norms)."""
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def flex_block_mask(kv_idx, kv_cnt, geom: Geometry):
    """draftopt's selection (+ dense text rows/columns) as a FlexAttention BlockMask of full blocks."""
    from torch.nn.attention.flex_attention import BlockMask

    B, H, S, _ = kv_idx.shape
    nb = geom.n_blocks
    dense = torch.ones(B, H, nb, nb, dtype=torch.bool, device=kv_idx.device)
    dense[:, :, :S, :S] = indices_to_dense(kv_idx, kv_cnt)
    full_cnt = dense.sum(-1, dtype=torch.int32)
    full_idx = torch.sort(dense.to(torch.uint8), dim=-1, descending=True, stable=True).indices.to(torch.int32)
    zeros_cnt, zeros_idx = torch.zeros_like(full_cnt), torch.zeros_like(full_idx)
    return BlockMask.from_kv_blocks(zeros_cnt, zeros_idx, full_cnt, full_idx, BLOCK_SIZE=geom.block), dense


def _layout_rows(tile, q, k, v, geom, s, policy, best, ref, row):
    """Where ``tile`` ("auto", "strips") means another tiling than the shape's 8x16 (e.g. "auto" at Wan2.1's
    45 x 80 frames: raster strips): its total and its stages 3-5, the FLOPs counted on its own blocks (``row``
    records them)."""
    layout = tile_layout(geom.grid, tile, s)  # "auto" at 0.5: 8 x 16 again (no extra rows)
    if layout.tile == geom.tile:
        return
    g = layout.geometry(geom.text_len, geom.text_position)
    scale = 128 ** -0.5
    kv_idx, kv_cnt = select_blocks(score_map(q, k, g, scale, policy), s, policy)
    _, blocks = flex_block_mask(kv_idx, kv_cnt, g)
    flops = int(blocks.sum()) * 4 * g.block * g.block * 128
    described = plan(g, q.dtype, q.device, 128, 1).describe()
    total = lambda: draft_attention(q, k, v, geom.grid, text_len=geom.text_len, tile=tile, sparsity=s,  # noqa
                                    policy=policy)
    ms, mem = timed(total, graph=True)
    label = f"tile {tile} = {layout.name}" if tile != layout.name else f"tile {tile}"
    row(f"draftopt total, {label}, pads {layout.padding:.1%} (CUDA graph; {described})", s, ms,
        mem, flops, best, rel_err(total(), ref))
    ms, mem = timed(lambda: tiled_attention(q, k, v, kv_idx, kv_cnt, g, scale=scale), graph=True)
    row(f"stages 3-5 as one op, {label} (tiled_attention: {described})", s, ms, mem, flops, None)


def _sage_row(q, k, v, ref, best, dense_flops, row):
    """Dense SageAttention (INT8 q k^T, FP16 P V; its Triton release, a peer of ``precision="fp8"``) where the
    ``sageattention`` package is installed (carry its wheel to the GPU machine); else a row that says so."""
    try:
        from sageattention import sageattn
    except ImportError as e:
        row(f"dense SageAttention: not installed ({e})", 0.0, None, None, None, None)
        return
    import importlib.metadata

    label = f"dense SageAttention {importlib.metadata.version('sageattention')} (INT8 q k, FP16 P V)"
    try:
        out = sageattn(q, k.clone(), v, tensor_layout="HND")  # it subtracts k's mean in place: a copy
        k_own = k.clone()  # timed on its own copy: after the first call the mean it subtracts is ~0
        ms, mem = timed(lambda: sageattn(q, k_own, v, tensor_layout="HND"))
    except Exception as e:  # an old Triton kernel on this Triton: say so, and go on
        row(f"dense SageAttention: failed ({type(e).__name__}: {str(e)[:80]})", 0.0, None, None, None, None)
        return
    row(label, 0.0, ms, mem, dense_flops, best, rel_err(out, ref))
    del out, k_own


def bench_shape(name, sparsities, flex_compiled, policy, extra_tiles=("auto",)):
    heads, geom = shape(name)
    grid, text_len = geom.grid, geom.text_len
    L = geom.seq_len
    q, k, v = (torch.randn(1, heads, L, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    dense_flops = 4 * heads * L * L * 128
    rows = []

    def row(label, sparsity, ms, mem, flops, best, err=None, err_bf16=None):
        rows.append(dict(shape=name, sparsity=sparsity, row=label, ms=None if ms is None else round(ms, 3),
                         speedup=round(best / ms, 2) if best and ms else None,
                         tflops=round(flops / ms / 1e9, 1) if flops and ms else None,
                         extra_gib=None if mem is None else round(mem, 2),
                         err_vs_dense=None if err is None else round(err, 4),
                         err_vs_bf16_sparse=None if err_bf16 is None else round(err_bf16, 4)))

    dense = {}
    for label, backend in [("dense cuDNN", SDPBackend.CUDNN_ATTENTION), ("dense flash", SDPBackend.FLASH_ATTENTION)]:
        with sdpa_kernel([backend]):
            dense[label] = timed(lambda: F.scaled_dot_product_attention(q, k, v))
    best = min(ms for ms, _ in dense.values())
    for label, (ms, mem) in dense.items():
        row(label, 0.0, ms, mem, dense_flops, best)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        ref = F.scaled_dot_product_attention(q, k, v)
    _sage_row(q, k, v, ref, best, dense_flops, row)
    fp8_plan = plan(geom, q.dtype, q.device, 128, 1, precision="fp8")
    if fp8_plan.fp8:
        out = draft_attention(q, k, v, grid, text_len=text_len, sparsity=0.0, precision="fp8")
        row("draftopt fp8, every block (error only)", 0.0, None, None, None, None, rel_err(out, ref))
        del out

    scale = 128 ** -0.5
    for s in sparsities:
        # stages on their own
        qp_pool, kp_pool = tile_pool(q, geom), tile_pool(k, geom)
        q_mom, k_mom = tile_moments(q, geom), tile_moments(k, geom)
        P = score_map(q, k, geom, scale, policy)
        kv_idx, kv_cnt = select_blocks(P, s, policy)
        qp, kp, vp = (permute_tiles(t, geom) for t in (q, k, v))
        out_p = block_sparse_attention(qp, kp, vp, kv_idx, kv_cnt, geom, scale=scale)
        bias = permuted_key_bias(None, 1, heads, geom, q.device)
        site_plan = plan(geom, q.dtype, q.device, 128, 1)
        attend_kernel = site_plan.backend.value
        flex_mask, blocks = flex_block_mask(kv_idx, kv_cnt, geom)
        kept_flops = int(blocks.sum()) * 4 * geom.block * geom.block * 128
        stages = {
            "stage pool (q, k)": lambda: (tile_pool(q, geom), tile_pool(k, geom)),
            "stage draft map": lambda: draft_map(qp_pool, kp_pool, scale),
            "stage tile moments (q, k)": lambda: (tile_moments(q, geom), tile_moments(k, geom)),
            "stage block mass": lambda: block_mass(*q_mom, *k_mom, geom, scale),
            "stage select": lambda: select_blocks(P, s, policy),
            "stage select, run-time sparsity (sort)": lambda: select_blocks_guarded(P, s, 1.0),
            "stage select, run-time sparsity + guard max_error 0.05": lambda: select_blocks_guarded(P, s, 0.05),
            **{f"stages 1-2 together, policy {pol}": (lambda pol=pol: select_blocks(
                score_map(q, k, geom, scale, pol), s, pol)) for pol in ("percentile", "mass")},
            "stage permute (q, k, v)": lambda: [permute_tiles(t, geom) for t in (q, k, v)],
            f"stage attend ({attend_kernel})": lambda: block_sparse_attention(qp, kp, vp, kv_idx, kv_cnt, geom,
                                                                              scale=scale),
            "stage unpermute": lambda: unpermute_tiles(out_p, geom),
            f"stages 3-5 as one op (tiled_attention: {site_plan.describe()})": lambda: tiled_attention(
                q, k, v, kv_idx, kv_cnt, geom, scale=scale),
            "attend, Triton kernel (tile-major)": lambda: block_sparse_attention_triton(
                qp, kp, vp, kv_idx, kv_cnt, bias, scale, geom.block, geom.n_text_blocks, geom.has_visual_padding),
        }
        total = lambda precision=None: draft_attention(q, k, v, grid, text_len=text_len, sparsity=s, policy=policy,
                                                       precision=precision)
        ms, mem = timed(total, graph=True)
        sparse_bf16 = total()
        row(f"draftopt total (CUDA graph; {site_plan.describe()})", s, ms, mem, kept_flops, best,
            rel_err(sparse_bf16, ref))
        for tile in extra_tiles:
            _layout_rows(tile, q, k, v, geom, s, policy, best, ref, row)
        if fp8_plan.fp8:
            ms, mem = timed(lambda: total("fp8"), graph=True)
            out = total("fp8")
            row(f"draftopt total, precision fp8 (CUDA graph; {fp8_plan.describe()})", s, ms, mem, kept_flops, best,
                rel_err(out, ref), rel_err(out, sparse_bf16))
            ops8 = fp8_operands(q, k, v, permuted_source_index(geom, q.device), geom.block)
            stages["stage fp8 quantize (q, k, v -> tile-major e4m3)"] = lambda: fp8_operands(
                q, k, v, permuted_source_index(geom, q.device), geom.block)
            stages["stage attend fp8 (gluon_sm90 on e4m3 tiles)"] = lambda: torch.ops.draftopt.attend_sm90_fp8(
                *ops8, kv_idx, kv_cnt, bias, scale, geom.n_tiles, geom.n_text_blocks, False, q.dtype,
                list(edge_grid(geom, False) or ()))  # padding masked by position, as the op does
            stages["stages 3-5 as one op, fp8 (tiled_attention)"] = lambda: tiled_attention(
                q, k, v, kv_idx, kv_cnt, geom, scale=scale, precision="fp8")
            del out
        for label, fn in stages.items():
            ms, mem = timed(fn, graph=True)
            row(label, s, ms, mem, kept_flops if "attend" in label or "3-5" in label else None, None)
        if flex_compiled is not None:
            ms, mem = timed(lambda: flex_compiled(qp, kp, vp, block_mask=flex_mask))
            row("FlexAttention (compiled, same blocks)", s, ms, mem, kept_flops, best)
        del qp, kp, vp, out_p, P, kv_idx, kv_cnt, flex_mask, blocks, sparse_bf16
        stages.clear()
        torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.8, 0.9, 0.95])
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes a minute)")
    ap.add_argument("--policy", default="mass", choices=list(POLICIES))
    ap.add_argument("--extra-tiles", nargs="*", default=["auto"], choices=["auto", "strips"],
                    help="tilings to time beside 8x16 where they differ from it (total and stages 3-5)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    flex = None
    if not args.no_flex:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    for name in args.shapes:
        rows += bench_shape(name, args.sparsities, flex, args.policy, args.extra_tiles)
        print(f"done {name}", flush=True)
    headers = list(rows[0])
    save_table("attention", headers, [[r[h] for h in headers] for r in rows],
               dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                    dtype="bfloat16", head_dim=128, policy=args.policy), args.out)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, bf16, D=128, "
          f"policy {args.policy}")
    print(tabulate([[r["shape"], r["sparsity"], r["row"], r["ms"] or "", r["speedup"] or "", r["tflops"] or "",
                     "" if r["extra_gib"] is None else r["extra_gib"], "" if r["err_vs_dense"] is None else r["err_vs_dense"],
                     "" if r["err_vs_bf16_sparse"] is None else r["err_vs_bf16_sparse"]] for r in rows],
                   headers=["shape", "sparsity", "row", "ms", "speedup", "TFLOP/s", "extra GiB", "err vs dense",
                            "err vs bf16 sparse"]))


if __name__ == "__main__":
    main()
