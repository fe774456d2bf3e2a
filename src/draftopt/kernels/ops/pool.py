"""Stage 1, pool: ``draftopt::tile_pool`` averages q (or k) over each tile of each frame.

``tile_pool(x [B, heads, L, D], geometry) -> [B, heads, S, D]`` in float32
(float64 for float64 input on the PyTorch path). Partial tiles at the
right/bottom edge average over their real tokens only; text tokens are not
pooled. ``draftopt::tile_moments`` also returns each tile's spread (the
variance of its tokens around the mean, averaged over the head dim) for the
"mass" policy, from the same pass over x.

Example:
    >>> from draftopt.kernels import Geometry, tile_pool
    >>> g = Geometry((2, 8, 16), tile=(8, 16))
    >>> tile_pool(torch.randn(1, 2, g.seq_len, 64), g).shape
    torch.Size([1, 2, 2, 64])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.library import triton_op

from .._utils import check_dtype, make_inference_only, refuse_grad
from ..dispatch import Backend, stage_backend
from ..geometry import Geometry, tile_token_counts
from ..triton.pool import tile_moments_triton, tile_pool_triton


def tile_pool_reference(x: torch.Tensor, geom: Geometry) -> torch.Tensor:
    """Pure PyTorch: zero-pad each frame to whole tiles, sum, divide by real-token counts."""
    B, n_heads, _, D = x.shape
    (T, H, W), (th, tw) = geom.grid, geom.tile
    nh, nw = geom.tiles_hw
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    vis = x.narrow(2, geom.visual_offset, geom.n_visual).to(acc).reshape(B, n_heads, T, H, W, D)
    vis = F.pad(vis, (0, 0, 0, nw * tw - W, 0, nh * th - H))
    sums = vis.reshape(B, n_heads, T, nh, th, nw, tw, D).sum(dim=(4, 6))
    counts = tile_token_counts(geom, x.device).to(acc)
    return sums.reshape(B, n_heads, geom.n_tiles, D) / counts[:, None]


def tile_moments_reference(x: torch.Tensor, geom: Geometry) -> tuple[torch.Tensor, torch.Tensor]:
    """(tile means [B, heads, S, D], spreads [B, heads, S]): mean over tokens and dims of (x - mean)^2."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    mean = tile_pool_reference(x, geom)
    centred_sq = tile_pool_reference(x.to(acc).pow(2), geom) - mean.pow(2)
    return mean, centred_sq.mean(dim=-1).clamp(min=0)


@triton_op("draftopt::tile_pool", mutates_args=())
def _tile_pool_op(
    x: torch.Tensor, T: int, H: int, W: int, th: int, tw: int, text_len: int, text_before: int
) -> torch.Tensor:
    geom = Geometry.from_op_args(T, H, W, th, tw, text_len, text_before)
    if stage_backend(x) is Backend.TRITON:
        return tile_pool_triton(x, geom)
    return tile_pool_reference(x, geom)


make_inference_only(_tile_pool_op, "tile_pool")


@triton_op("draftopt::tile_moments", mutates_args=())
def _tile_moments_op(
    x: torch.Tensor, T: int, H: int, W: int, th: int, tw: int, text_len: int, text_before: int
) -> tuple[torch.Tensor, torch.Tensor]:
    geom = Geometry.from_op_args(T, H, W, th, tw, text_len, text_before)
    if stage_backend(x) is Backend.TRITON:
        return tile_moments_triton(x, geom)
    return tile_moments_reference(x, geom)


make_inference_only(_tile_moments_op, "tile_moments")


def tile_pool(x: torch.Tensor, geom: Geometry) -> torch.Tensor:
    """Average ``x`` [B, heads, L, D] over each tile of ``geom``: [B, heads, S, D] float32."""
    if x.dim() != 4:
        raise ValueError(f"tile_pool expects [B, heads, L, D], got shape {tuple(x.shape)}")
    geom.check_seq_len(x.shape[2], "tile_pool input")
    check_dtype("tile_pool input", x)
    refuse_grad("tile_pool", x)
    return torch.ops.draftopt.tile_pool(x, *geom.op_args())


def tile_moments(x: torch.Tensor, geom: Geometry) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile means [B, heads, S, D] and spreads [B, heads, S] of ``x`` [B, heads, L, D], float32."""
    if x.dim() != 4:
        raise ValueError(f"tile_moments expects [B, heads, L, D], got shape {tuple(x.shape)}")
    geom.check_seq_len(x.shape[2], "tile_moments input")
    check_dtype("tile_moments input", x)
    refuse_grad("tile_moments", x)
    return torch.ops.draftopt.tile_moments(x, *geom.op_args())
