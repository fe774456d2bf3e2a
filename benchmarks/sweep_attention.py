"""Launch-config sweep of the block-sparse attention kernel (the attend stage alone).

    python benchmarks/sweep_attention.py [--shape hunyuan720p] [--sparsity 0.9] [--gluon-only] [--fp8]
                                         [--only LABEL ...]

Times each Triton (BLOCK_M, BLOCK_N, num_warps, num_stages), on tile-major
copies and with tiles addressed in place, and on sm_90 each Gluon kernel
variant of SM90_CONFIGS (ring sizes, ping-pong, rotated key sweeps, in place,
P's row sums as a product (Sm90Tuning.rowsum_mma); interleaved rounds, and a
"same-keys" locality bound; on a padded grid also the in-place kernel masking
edge tiles' padding by the bias row instead of by position; with --fp8 also the
FP8 kernel's ring sizes, ping-pong and row sums on e4m3 copies), on one
real-model shape; checks each output against the default's and prints a table sorted by time.
Why the defaults are what they are: docs/design.md.
"""

import argparse

import torch
import triton
from tabulate import tabulate

from _results import save_table
from _shapes import SHAPES, shape

from draftopt.kernels import draft_map, permute_tiles, permuted_key_bias, select_blocks, tile_pool, unpermute_tiles
from draftopt.kernels.dispatch import sm90_misfit
from draftopt.kernels.gluon import _sm90_kernel
from draftopt.kernels.geometry import permuted_source_index
from draftopt.kernels.gluon.attention import (Sm90Tuning, attend_sm90, attend_sm90_fp8, attend_sm90_in_place,
                                              edge_grid)
from draftopt.kernels.ops.quantize import fp8_operands
from draftopt.kernels.triton.attention import (AttentionTuning, block_sparse_attention_triton, launch_config,
                                               tiled_attention_triton)

# (BLOCK_M, BLOCK_N, num_warps, num_stages, tiles addressed in place in the original order)
CONFIGS = [(128, 128, 8, 3, False), (128, 128, 8, 3, True), (128, 128, 8, 2, False), (128, 128, 8, 2, True),
           (128, 64, 8, 3, False), (128, 64, 8, 3, True), (64, 128, 4, 3, True), (128, 64, 8, 2, True)]
ROUNDS = 3
# Gluon kernel: (K, V buffers, ping-pong, rotated sweeps, in place, key lists, row sums by a product)
SM90_CONFIGS = [(2, 3, True, True, False, "real", False), (2, 3, False, True, False, "real", False),
                (2, 2, True, True, False, "real", False), (2, 2, False, True, False, "real", False),
                (2, 3, True, True, True, "real", False), (2, 3, False, True, True, "real", False),
                (2, 3, True, False, False, "real", False), (2, 3, True, False, False, "same", False),
                (2, 3, True, True, False, "real", True), (2, 3, True, True, True, "real", True),
                (2, 3, False, True, True, "real", True)]
# FP8 mode of the Gluon kernel (tile-major e4m3 copies): (K, V buffers, ping-pong, row sums by a product)
SM90_FP8_CONFIGS = [(2, 3, False, False), (2, 3, True, False), (2, 4, True, False), (3, 4, True, False),
                    (4, 4, True, False), (4, 4, False, False), (2, 3, False, True), (2, 3, True, True)]


def _print_registers(kernel):
    """Registers and spills of each compiled variant (Triton's cache layout; best effort)."""
    try:
        for cache in kernel.device_caches.values():
            for compiled in cache[0].values():
                print(f"{compiled.name}: {compiled.n_regs} registers, {compiled.n_spills} spills, "
                      f"{compiled.metadata.shared} B shared", flush=True)
    except Exception as e:  # the cache layout is Triton-internal
        print(f"(registers unavailable: {type(e).__name__})")


def _label(name, in_place):
    return name + (" in place" if in_place else "")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="hunyuan720p", choices=list(SHAPES))
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--gluon-only", action="store_true", help="time only the Gluon kernel's configs")
    ap.add_argument("--fp8", action="store_true", help="also the Gluon kernel's FP8 mode (SM90_FP8_CONFIGS)")
    ap.add_argument("--only", nargs="+", metavar="LABEL", default=None,
                    help="time only the Gluon configs whose label (as printed, ' in place' appended for the "
                         "in-place kernel) is one of these, e.g. 'gluon K2 V3 pp rot in place'")
    args = ap.parse_args()
    heads, g = shape(args.shape)
    q, k, v = (torch.randn(1, heads, g.seq_len, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    scale = 128 ** -0.5
    kv_idx, kv_cnt = select_blocks(draft_map(tile_pool(q, g), tile_pool(k, g), scale), args.sparsity, "percentile")
    qp, kp, vp = (permute_tiles(t, g) for t in (q, k, v))
    bias = permuted_key_bias(None, 1, heads, g, q.device)
    pairs = int(kv_cnt.sum()) + heads * (g.n_tiles * g.n_text_blocks + g.n_text_blocks * g.n_blocks)
    flops = pairs * 4 * g.block * g.block * 128
    cnt = kv_cnt.float()
    print(f"kept blocks per query tile: mean {cnt.mean():.1f}, max {cnt.max():.0f}, min {cnt.min():.0f}; "
          f"a text query block: {g.n_blocks}")
    visual_bias = g.has_visual_padding  # no mask on visual keys: the kernel skips their bias add
    edges = edge_grid(g, False)  # the Gluon kernel masks edge tiles' padding by position instead
    run_tile_major = lambda cfg: unpermute_tiles(  # noqa: E731
        block_sparse_attention_triton(qp, kp, vp, kv_idx, kv_cnt, bias, scale, g.block, g.n_text_blocks,
                                      visual_bias, cfg), g)
    run_in_place = lambda cfg: tiled_attention_triton(q, k, v, kv_idx, kv_cnt, bias, scale, g,  # noqa: E731
                                                      visual_bias, cfg)
    want = run_tile_major(None).float()
    assert not want.isnan().any()
    rows = []
    for bm, bn, w, s, in_place in CONFIGS[:1] if args.gluon_only else CONFIGS:
        cfg = AttentionTuning(bm, bn, w, s)
        run = run_in_place if in_place else run_tile_major
        try:
            err = ((run(cfg).float() - want).norm() / want.norm()).item()
            ms = triton.testing.do_bench(lambda: run(cfg), warmup=25, rep=200, return_mode="median")
            rows.append([bm, bn, w, s, in_place, round(ms, 3), round(flops / ms / 1e9, 1), f"{err:.1e}"])
        except Exception as e:  # e.g. out of shared memory
            rows.append([bm, bn, w, s, in_place, None, None, f"{type(e).__name__}: {str(e)[:60]}"])
        print(rows[-1], flush=True)
    if sm90_misfit(g.block, q.dtype, q.device, 128) is None and _sm90_kernel.HAVE_GLUON:
        # Diagnostic: every query row keeps blocks 0..cnt-1 (same FLOPs, best possible L2 reuse of K and V).
        same_idx = torch.arange(kv_idx.shape[-1], device=q.device, dtype=kv_idx.dtype).expand_as(kv_idx).contiguous()
        runs = {}
        for ks, vs, pp, rot, in_place, idx, rs in SM90_CONFIGS:
            label = (f"gluon K{ks} V{vs}{' pp' if pp else ''}{' rot' if rot else ''}"
                     f"{' same-keys' if idx == 'same' else ''}{' rowsum-mma' if rs else ''}")
            if args.only is not None and _label(label, in_place) not in args.only:
                continue  # a short sweep: only the named configs
            ki = same_idx if idx == "same" else kv_idx
            tuning = Sm90Tuning(ks, vs, pp, rot, rs)
            if in_place:  # no key mask: edge tiles' padding is masked by position
                run_sm90 = lambda ki=ki, t=tuning: attend_sm90_in_place(  # noqa: E731
                    q, k, v, ki, kv_cnt, bias, scale, g, False, t)
                finish = lambda o: o  # noqa: E731
            else:  # timed without the unpermute (the op-level benchmark times the stages separately)
                run_sm90 = lambda ki=ki, t=tuning: attend_sm90(  # noqa: E731
                    qp, kp, vp, ki, kv_cnt, bias, scale, g.n_tiles, g.n_text_blocks, False, t, edges)
                finish = lambda o: unpermute_tiles(o, g)  # noqa: E731
            err = ((finish(run_sm90()).float() - want).norm() / want.norm()).item()
            runs[(label, in_place)] = (run_sm90, "n/a (other keys)" if idx == "same" else f"{err:.1e}", [])
        if g.has_visual_padding and args.only is None:  # padding masked by the bias row (as with a key mask)
            run_sm90 = lambda: attend_sm90_in_place(q, k, v, kv_idx, kv_cnt, bias, scale, g, True,  # noqa: E731
                                                    Sm90Tuning())
            err = ((run_sm90().float() - want).norm() / want.norm()).item()
            runs[("gluon K2 V3 pp rot, padding by the bias", True)] = (run_sm90, f"{err:.1e}", [])
        if args.fp8:  # the error against the bf16 default is FP8's own (~5% on these random inputs)
            operands = fp8_operands(q, k, v, permuted_source_index(g, q.device), g.block)
            for ks, vs, pp, rs in SM90_FP8_CONFIGS:
                key = (f"gluon fp8 K{ks} V{vs}{' pp' if pp else ''} rot{' rowsum-mma' if rs else ''}", False)
                if args.only is not None and _label(*key) not in args.only:
                    continue
                run_sm90 = lambda t=Sm90Tuning(ks, vs, pp, True, rs): attend_sm90_fp8(  # noqa: E731
                    *operands, kv_idx, kv_cnt, bias, scale, g.n_tiles, g.n_text_blocks, False, q.dtype, t, edges)
                err = ((unpermute_tiles(run_sm90(), g).float() - want).norm() / want.norm()).item()
                runs[key] = (run_sm90, f"{err:.1e}", [])
        # Rounds over all configs, interleaved: one config's median drifts with the GPU's clocks and
        # L2 state over a sweep (docs/design.md, "How the numbers are taken").
        for _ in range(ROUNDS):
            for run_sm90, _, times in runs.values():
                times.append(triton.testing.do_bench(run_sm90, warmup=10, rep=60, return_mode="median"))
        for (label, in_place), (_, err, times) in runs.items():
            ms = sorted(times)[len(times) // 2]
            rows.append([label, 128, 8, None, in_place, round(ms, 3), round(flops / ms / 1e9, 1),
                         f"{err}; rounds {min(times):.2f}-{max(times):.2f}"])
        _print_registers(_sm90_kernel._attend_sm90_kernel)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        dense_ms = triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
                                           warmup=25, rep=200, return_mode="median")
    dense_tflops = 4 * heads * g.seq_len ** 2 * 128 / dense_ms / 1e9
    print(f"dense cuDNN: {dense_ms:.1f} ms = {dense_tflops:.0f} TFLOP/s")
    default = launch_config(torch.bfloat16, g.block, 128)
    print(f"{args.shape} sparsity {args.sparsity}: {pairs} block pairs, {flops / 1e12:.2f} TFLOP; default {default}; "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    rows.sort(key=lambda r: (r[5] is None, r[5]))
    headers = ["BLOCK_M", "BLOCK_N", "warps", "stages", "in place", "ms", "TFLOP/s", "rel err vs default"]
    save_table("sweep_attention", headers, rows, dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                                      triton=triton.__version__, shape=args.shape,
                                                      sparsity=args.sparsity, dense_cudnn_ms=dense_ms))
    print(tabulate(rows, headers=headers))


if __name__ == "__main__":
    main()
