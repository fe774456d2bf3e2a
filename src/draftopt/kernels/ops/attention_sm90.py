"""``draftopt::attend_sm90``, ``draftopt::attend_sm90_in_place``, ``draftopt::attend_sm90_fp8`` and
``draftopt::attend_sm90_fp8_in_place``: the Gluon Hopper kernel as ops.

Opaque custom ops (not triton_ops): torch.compile cannot trace a Gluon launch,
so Inductor calls these as extern kernels; they sync nothing, so CUDA graphs
capture them. The attention ops (attention.py) call them for the
``gluon_sm90`` backend; the kernel is gluon/_sm90_kernel.py.
"""

from __future__ import annotations

import torch

from ..geometry import Geometry
from ..gluon.attention import attend_sm90, attend_sm90_fp8, attend_sm90_in_place


@torch.library.custom_op("draftopt::attend_sm90", mutates_args=())
def _attend_sm90_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_idx: torch.Tensor, kv_cnt: torch.Tensor,
                    bias: torch.Tensor, scale: float, n_tiles: int, n_text_blocks: int,
                    visual_bias: bool, edges: list[int]) -> torch.Tensor:
    """Tile-major q, k, v [B, heads, Lp, D] -> tile-major output. ``edges``: [H, W, tile_h, tile_w] of a
    padded grid whose edge tiles' padding keys are masked by position (``gluon.attention.edge_grid``), or
    [] where the bias masks them."""
    return attend_sm90(q, k, v, kv_idx, kv_cnt, bias, scale, n_tiles, n_text_blocks, visual_bias,
                       edges=_edges(edges))


def _edges(edges: list[int]) -> tuple[int, ...] | None:
    if len(edges) not in (0, 4):
        raise ValueError(f"edges must be [] or [H, W, tile_h, tile_w], got {edges}")
    return tuple(edges) or None


@_attend_sm90_op.register_fake
def _(q, k, v, kv_idx, kv_cnt, bias, scale, n_tiles, n_text_blocks, visual_bias, edges):
    return q.new_empty(q.shape)


@torch.library.custom_op("draftopt::attend_sm90_in_place", mutates_args=())
def _attend_sm90_in_place_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_idx: torch.Tensor,
                             kv_cnt: torch.Tensor, bias: torch.Tensor, scale: float, T: int, H: int, W: int, th: int,
                             tw: int, text_len: int, text_before: int, visual_bias: bool) -> torch.Tensor:
    """Original-order q, k, v [1, heads, L, D] -> output in the original order (tiles read in place).
    ``visual_bias``: whether ``bias`` may be nonzero on the grid's real keys (edge tiles' padding keys are
    masked by position without it)."""
    geom = Geometry.from_op_args(T, H, W, th, tw, text_len, text_before)
    return attend_sm90_in_place(q, k, v, kv_idx, kv_cnt, bias, scale, geom, visual_bias)


@_attend_sm90_in_place_op.register_fake
def _(q, k, v, kv_idx, kv_cnt, bias, scale, T, H, W, th, tw, text_len, text_before, visual_bias):
    return torch.empty_like(q)


@torch.library.custom_op("draftopt::attend_sm90_fp8", mutates_args=())
def _attend_sm90_fp8_op(q8: torch.Tensor, k8: torch.Tensor, vt8: torch.Tensor, q_scale: torch.Tensor,
                        k_scale: torch.Tensor, v_scale: torch.Tensor, kv_idx: torch.Tensor, kv_cnt: torch.Tensor,
                        bias: torch.Tensor, scale: float, n_tiles: int, n_text_blocks: int, visual_bias: bool,
                        out_dtype: torch.dtype, edges: list[int]) -> torch.Tensor:
    """Tile-major e4m3 q8, k8 [B, heads, Lp, D] and V^T vt8 [B, heads, D, Lp] (ops/quantize.py) -> tile-major
    output in ``out_dtype``. ``edges``: as draftopt::attend_sm90's."""
    return attend_sm90_fp8(q8, k8, vt8, q_scale, k_scale, v_scale, kv_idx, kv_cnt, bias, scale, n_tiles,
                           n_text_blocks, visual_bias, out_dtype, edges=_edges(edges))


@_attend_sm90_fp8_op.register_fake
def _(q8, k8, vt8, q_scale, k_scale, v_scale, kv_idx, kv_cnt, bias, scale, n_tiles, n_text_blocks, visual_bias,
      out_dtype, edges):
    return q8.new_empty(q8.shape, dtype=out_dtype)


@torch.library.custom_op("draftopt::attend_sm90_fp8_in_place", mutates_args=())
def _attend_sm90_fp8_in_place_op(q8: torch.Tensor, k8: torch.Tensor, vt8: torch.Tensor, q_scale: torch.Tensor,
                                 k_scale: torch.Tensor, v_scale: torch.Tensor, kv_idx: torch.Tensor,
                                 kv_cnt: torch.Tensor, bias: torch.Tensor, scale: float, visual_bias: bool,
                                 out_dtype: torch.dtype, edges: list[int], T: int, H: int, W: int, th: int, tw: int,
                                 text_len: int, text_before: int) -> torch.Tensor:
    """draftopt::attend_sm90_fp8 at batch 1 with the output written in place: [1, heads, L, D] in the original
    token order of the geometry (T, H, W, th, tw, text_len, text_before), so no unpermute follows."""
    geom = Geometry.from_op_args(T, H, W, th, tw, text_len, text_before)
    return attend_sm90_fp8(q8, k8, vt8, q_scale, k_scale, v_scale, kv_idx, kv_cnt, bias, scale, geom.n_tiles,
                           geom.n_text_blocks, visual_bias, out_dtype, edges=_edges(edges), out_geom=geom)


@_attend_sm90_fp8_in_place_op.register_fake
def _(q8, k8, vt8, q_scale, k_scale, v_scale, kv_idx, kv_cnt, bias, scale, visual_bias, out_dtype, edges,
      T, H, W, th, tw, text_len, text_before):
    L = Geometry.from_op_args(T, H, W, th, tw, text_len, text_before).seq_len
    return q8.new_empty((1, q8.shape[1], L, q8.shape[3]), dtype=out_dtype)
