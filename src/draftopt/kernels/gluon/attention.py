"""Launchers of the Hopper attention kernel (_sm90_kernel.py): tile-major, or tiles in place at batch 1.

``Sm90Tuning`` holds the kernel's schedule switches (ring sizes, ping-pong,
rotated key sweeps). The defaults are the measured best (docs/design.md,
"Hopper: why a Gluon kernel"; benchmarks/sweep_attention.py times the others); the ops
never take them, only the sweep does.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .._utils import LOG2E
from ..geometry import Geometry
from . import _sm90_kernel as K

BLOCK = 128
HEAD_DIMS = (64, 128)
DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Sm90Tuning:
    """The Gluon kernel's schedule: K and V ring buffers (q 32 KB + 5 x 32 KB at D 128, one program
    per SM), consumers taking turns (ping-pong), key sweeps staggered by launch order (rotate), P's row
    sums as a narrow product beside P V instead of additions after each softmax (rowsum_mma: 4% faster in
    FP8, no faster than the additions in bf16 on the H200, docs/design.md)."""

    k_stages: int = 2
    v_stages: int = 3
    pingpong: bool = True
    rotate: bool = True
    rowsum_mma: bool = False


DEFAULT_TUNING = Sm90Tuning()
# FP8 runs best without ping-pong (24.76 ms against 25.62) and with its row sums as a product (23.10 against
# 24.13) at HunyuanVideo 720p 0.9 on the H200 (docs/design.md).
DEFAULT_FP8_TUNING = Sm90Tuning(pingpong=False, rowsum_mma=True)


def reads_in_place(geom: Geometry, batch: int) -> bool:
    """Whether the kernel can address this geometry's tiles in place: batch 1 (the descriptors view one
    batch), tiles split in two halves (one per consumer; row halves, or column halves of a one-row tile)
    of whole 16-byte rows, and text on one side of the grid only (one row descriptor for the text; text on
    both sides runs on permuted copies)."""
    th, tw = geom.tile
    halves = th % 2 == 0 and tw % 8 == 0 or th == 1 and tw % 16 == 0
    return batch == 1 and halves and not geom.is_split


@functools.lru_cache(maxsize=None)
def _n_sm(index) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _gl_dtype(dtype):
    return {torch.bfloat16: K.gl.bfloat16, torch.float16: K.gl.float16, torch.float8_e4m3fn: K.gl.float8e4nv}[dtype]


def _desc(t, shape, strides, block, gl_dtype):
    return K.TensorDescriptor(t, shape, strides, block, K.gl.NVMMASharedLayout.get_default_for(block, gl_dtype))


def edge_grid(geom: Geometry, visual_bias: bool) -> tuple[int, int, int, int] | None:
    """(H, W, tile_h, tile_w) where the kernel masks the padding keys of ``geom``'s edge tiles by their
    position (a padded grid, and no key mask: the bias is then zero on every real visual key), else None."""
    if not geom.has_visual_padding or visual_bias:
        return None
    return (*geom.grid[1:], *geom.tile)


def _launch(tm, boxes, texts, bias, kv_idx, kv_cnt, scale, n_heads, n_tiles, n_text_blocks, Lp, nw, nhw, tile_h,
            visual_bias, in_place, tuning: Sm90Tuning, fp8_scales=None, edges: tuple[int, ...] | None = None,
            store_in_place: bool | None = None):
    """``edges``: (H, W, tile_h, tile_w) of a padded grid whose edge tiles' padding keys the kernel masks
    by position (``edge_grid``: the tile's index, no bias row); None where the bias (or nothing: an exact
    grid) does. Tile-major copies keep each tile's tokens in box order, as the tiles in place are.
    ``in_place``: q, k, v read in place; ``store_in_place`` (default: ``in_place``): the output written so."""
    if Lp != (n_tiles + n_text_blocks) * BLOCK:
        raise RuntimeError(f"draftopt internal error: {Lp} rows are not {n_tiles} tiles + {n_text_blocks} text blocks")
    bias_b = bias.expand(kv_cnt.shape[0], n_heads, Lp)
    n_bh = kv_cnt.shape[0] * n_heads
    scales = fp8_scales if fp8_scales is not None else (bias_b,) * 3  # unread without FP8
    # Constexpr, so the kernel's divisions by them are multiply-shifts: one compile per padded grid.
    edge_th, e_nw, e_nhw, e_nh, e_rows, e_cols = 1, 1, 1, 1, 1, 1
    if edges is not None:
        H, W, edge_th, tw = edges
        e_nh, e_nw = -(-H // edge_th), -(-W // tw)
        e_nhw, e_rows, e_cols = e_nh * e_nw, H - (e_nh - 1) * edge_th, W - (e_nw - 1) * tw
    K._attend_sm90_kernel[((n_tiles + n_text_blocks) * n_bh,)](
        *tm, *boxes, *texts, bias_b, kv_idx, kv_cnt, *scales,
        bias_b.stride(0), bias_b.stride(1), kv_idx.stride(0), kv_idx.stride(1), kv_idx.stride(2),
        kv_cnt.stride(0), kv_cnt.stride(1),
        n_heads, n_bh, n_tiles, n_text_blocks, Lp, scale * LOG2E, nw, nhw, _n_sm(kv_cnt.device.index),
        VISUAL_BIAS=bool(visual_bias), K_STAGES=tuning.k_stages, V_STAGES=tuning.v_stages, TILE_H=tile_h,
        IN_PLACE=in_place, PINGPONG=tuning.pingpong, ROTATE=tuning.rotate, FP8=fp8_scales is not None,
        EDGE=edges is not None, EDGE_TH=edge_th, E_NW=e_nw, E_NHW=e_nhw, E_NH=e_nh, E_ROWS=e_rows, E_COLS=e_cols,
        ROWSUM_MMA=tuning.rowsum_mma, STORE_IN_PLACE=in_place if store_in_place is None else store_in_place,
        num_warps=4,
    )


def attend_sm90(q, k, v, kv_idx, kv_cnt, bias, scale, n_tiles, n_text_blocks, visual_bias,
                tuning: Sm90Tuning = DEFAULT_TUNING, edges: tuple[int, ...] | None = None):
    """Tile-major q, k, v [B, heads, Lp, D] -> tile-major output; ``bias`` [B|1, heads|1, Lp] float32.
    ``edges`` (``edge_grid``): mask edge tiles' padding by position, not by the bias."""
    B, heads, Lp, D = q.shape
    q, k, v = (t.contiguous() for t in (q, k, v))
    out = torch.empty((B, heads, Lp, D), dtype=q.dtype, device=q.device)
    gl_dtype = _gl_dtype(q.dtype)
    rows = B * heads * Lp
    # q and out move in halves: each consumer warpgroup loads and stores its own 64 rows.
    tm = [_desc(t, [rows, D], [D, 1], [BLOCK // (2 if t is q or t is out else 1), D], gl_dtype)
          for t in (q, k, v, out)]
    _launch(tm, tm, tm, bias, kv_idx.contiguous(), kv_cnt, scale, heads, n_tiles, n_text_blocks, Lp, 1, 1, 2,
            visual_bias, False, tuning, edges=edges)
    return out


def attend_sm90_fp8(q8, k8, vt8, q_scale, k_scale, v_scale, kv_idx, kv_cnt, bias, scale, n_tiles, n_text_blocks,
                    visual_bias, out_dtype, tuning: Sm90Tuning = DEFAULT_FP8_TUNING,
                    edges: tuple[int, ...] | None = None, out_geom: Geometry | None = None):
    """FP8 attention on tile-major e4m3 operands (``triton/quantize.py`` makes them): q8, k8 [B, heads, Lp, D],
    vt8 = V^T [B, heads, D, Lp] (tokens in ``ops/quantize.fp8_key_order`` within each 16); float32 scales
    q_scale [B, heads, Lp / 128], k_scale and v_scale [B, heads].
    Returns the tile-major output [B, heads, Lp, D] in ``out_dtype`` (16-bit); with ``out_geom`` (batch 1, a
    geometry ``reads_in_place``) the output in the original token order [1, heads, L, D], written in place
    (no unpermute). ``edges``: as attend_sm90's."""
    B, heads, Lp, D = q8.shape
    if out_geom is not None and not reads_in_place(out_geom, B):
        raise ValueError(f"attend_sm90_fp8 cannot write this geometry's output in place ({out_geom}, batch {B}); "
                         "pass out_geom=None for the tile-major output")
    f8 = _gl_dtype(torch.float8_e4m3fn)
    rows = B * heads * Lp
    qd = _desc(q8, [rows, D], [D, 1], [BLOCK // 2, D], f8)
    kd = _desc(k8, [rows, D], [D, 1], [BLOCK, D], f8)
    vd = _desc(vt8, [B * heads * D, Lp], [Lp, 1], [D, BLOCK], f8)
    scales = (q_scale.contiguous(), k_scale.contiguous(), v_scale.contiguous())
    if out_geom is None:
        out = torch.empty((B, heads, Lp, D), dtype=out_dtype, device=q8.device)
        od = _desc(out, [rows, D], [D, 1], [BLOCK // 2, D], _gl_dtype(out_dtype))
        tm = [qd, kd, vd, od]
        _launch(tm, tm, tm, bias, kv_idx.contiguous(), kv_cnt, scale, heads, n_tiles, n_text_blocks, Lp, 1, 1, 2,
                visual_bias, False, tuning, scales, edges)
        return out
    out = torch.empty((1, heads, out_geom.seq_len, D), dtype=out_dtype, device=q8.device)
    of, ob, ot = _in_place_views(out, out_geom, True)  # q, k, v's box and text slots: unread (tile-major loads)
    nh, nw = out_geom.tiles_hw
    _launch([qd, kd, vd, of], [qd, kd, vd, ob], [qd, kd, vd, ot], bias, kv_idx.contiguous(), kv_cnt, scale, heads,
            n_tiles, n_text_blocks, Lp, nw, nh * nw, out_geom.tile[0], visual_bias, False, tuning, scales, edges,
            store_in_place=True)
    return out


def _tma_strides(t) -> bool:
    # TMA: unit inner stride, the others and the start 16-byte aligned (8 elements of 16 bits).
    return t.stride(-1) == 1 and t.stride(1) % 8 == 0 and t.stride(2) % 8 == 0 and t.storage_offset() % 8 == 0


def _tma_ready(t):
    """``t`` itself where TMA can read it in place, else a contiguous copy (a layout the copy engine
    cannot address, or a user's buffer at an unaligned address)."""
    return t if _tma_strides(t) and t.data_ptr() % 16 == 0 else t.clone(memory_format=torch.contiguous_format)


def _in_place_views(t, geom: Geometry, half: bool):
    """Descriptors of an original-order [1, heads, L, D] tensor for the in-place kernel: a flat one (only for
    its block type), the [heads, T, H, W, D] box view of the visual tiles (``half``: half a tile a box, one
    consumer's rows) and the rows of the text."""
    (T, H, W), (th, tw) = geom.grid, geom.tile
    _, heads, L, D = t.shape
    gl_dtype = _gl_dtype(t.dtype)
    s_head, s_tok = t.stride(1), t.stride(2)
    rows = BLOCK // 2 if half else BLOCK
    flat = _desc(t[0, 0], [L, D], [s_tok, 1], [rows, D], gl_dtype)
    box_hw = ((th // 2, tw) if th > 1 else (1, tw // 2)) if half else (th, tw)
    box = _desc(t[0, :, geom.visual_offset:], [heads, T, H, W, D], [s_head, H * W * s_tok, W * s_tok, s_tok, 1],
                [1, 1, *box_hw, D], gl_dtype)
    n_text = geom.text_len or L  # without text the text descriptors are never used
    text = _desc(t[0, :, geom.text_offset if geom.text_len else 0:], [heads, n_text, D], [s_head, s_tok, 1],
                 [1, rows, D], gl_dtype)
    return flat, box, text


def attend_sm90_in_place(q, k, v, kv_idx, kv_cnt, bias, scale, geom: Geometry, visual_bias,
                         tuning: Sm90Tuning = DEFAULT_TUNING):
    """Stages 3-5 in one kernel: original-order q, k, v [1, heads, L, D] -> output with q's strides.

    Visual tiles move as TMA boxes of the [heads, T, H, W, D] view (edge tiles are
    clipped by the copy engine: zeros in, nothing out), text blocks as rows of the
    text; no permuted copies exist. ``visual_bias``: whether ``bias`` may be nonzero
    on the grid's real keys (a key padding mask); without one, the padding keys of
    edge tiles are masked by their position, not by the bias (at Wan2.1-14B 720p
    26.6 -> 22.6 ms: docs/design.md, "Edge tiles masked by position").
    """
    heads = q.shape[1]
    if not reads_in_place(geom, q.shape[0]):
        raise ValueError(f"attend_sm90_in_place cannot address this geometry in place ({geom}, batch "
                         f"{q.shape[0]}); call draftopt::tiled_attention, which permutes such sites")
    th = geom.tile[0]
    out = torch.empty_like(q)  # fresh, so aligned; q's strides where q is dense, else contiguous
    q, k, v, out = (_tma_ready(t) for t in (q, k, v, out))
    (qf, qb, qt), (kf, kb, kt), (vf, vb, vt), (of, ob, ot) = (_in_place_views(t, geom, t is q or t is out)
                                                              for t in (q, k, v, out))
    nh, nw = geom.tiles_hw
    _launch([qf, kf, vf, of], [qb, kb, vb, ob], [qt, kt, vt, ot], bias, kv_idx.contiguous(), kv_cnt, scale, heads,
            geom.n_tiles, geom.n_text_blocks, geom.padded_len, nw, nh * nw, th, visual_bias, True, tuning,
            edges=edge_grid(geom, visual_bias))
    return out
