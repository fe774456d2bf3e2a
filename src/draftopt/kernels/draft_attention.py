"""The five stages in one call: pool -> mask -> permute -> sparse-attn -> unpermute.

Example:
    >>> import torch
    >>> from draftopt.kernels import draft_attention
    >>> q, k, v = torch.randn(3, 2, 4, 2 * 16 * 32 + 77, 64).unbind(0)
    >>> out, mask = draft_attention(q, k, v, grid=(2, 16, 32), text_len=77,
    ...                             sparsity=0.75, return_mask=True)
    >>> out.shape, mask.shape
    (torch.Size([2, 4, 1101, 64]), (2, 4, 8, 8))
"""

from __future__ import annotations

import torch

from ._utils import MAX_HEAD_DIM, check_dtype, check_mask_dtype, refuse_grad
from .block_mask import DraftBlockMask
from .dispatch import plan, require_precision
from .geometry import Geometry
from .layout import tile_layout
from .ops.attention import block_sparse_attention, tiled_attention
from .ops.block_mass import block_mass
from .ops.draft_map import draft_map
from .ops.key_bias import needs_visual_bias, permuted_key_bias
from .ops.permute import permute_tiles, unpermute_tiles
from .ops.pool import tile_moments, tile_pool
from .ops.select import select_blocks
from .sparsity import check_selection_args, dense_indices


def score_map(q: torch.Tensor, k: torch.Tensor, geom: Geometry, scale: float, policy: str) -> torch.Tensor:
    """The map a policy ranks: the estimated block mass for "mass", else the paper's draft map."""
    if policy == "mass":
        return block_mass(*tile_moments(q, geom), *tile_moments(k, geom), geom, scale)
    return draft_map(tile_pool(q, geom), tile_pool(k, geom), scale)


def draft_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: tuple[int, int, int],
    *,
    tile: tuple[int, int] | str = (8, 16),
    text_len: int | None = None,
    text_position: str | int = "end",
    sparsity: float = 0.9,
    policy: str = "mass",
    cdf_threshold: float = 0.9,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    precision: str | None = None,
    return_mask: bool = False,
):
    """Draft attention for a video self-attention call, a drop-in for SDPA.

    Args:
        q, k, v: [B, heads, L, D], L = T*H*W visual tokens + text tokens.
        grid: (T, H, W) visual tokens.
        tile: tokens per tile (th, tw); th*tw is one kernel block. "strips" or "auto": the
            tilings of ``draftopt.kernels.layout`` (128-token raster strips per frame; strips
            or 8 x 16 by the grid's padding and the sparsity, as ``draftopt.optimize`` does
            by default).
        text_len: text tokens in L (default 0: the grid must explain the whole sequence).
        text_position: "start", "end", or how many of the text_len tokens come before the
            grid (the rest after it: FramePack's history, grid, text).
        sparsity: fraction of visual tile pairs to skip, in [0, 1).
        policy: "mass" (default), "percentile" (the paper), "topk" or "cdf" (see ``sparsity.py``).
        cdf_threshold: draft mass a query tile must cover, for "cdf".
        attn_mask: optional key padding mask (bool: True = attend, or additive).
        scale: softmax scale (default 1/sqrt(D)).
        precision: None (q's dtype) or "fp8": e4m3 products on Hopper (simulated on the CPU);
            a ValueError where no kernel for it runs (``DraftConfig`` explains the scheme).
        return_mask: also return the DraftBlockMask that was used.

    Returns:
        [B, heads, L, D] in q's dtype (and the DraftBlockMask if asked).
    """
    if q.dim() != 4 or not (q.shape == k.shape == v.shape):
        raise ValueError(
            "draft_attention needs self-attention q, k, v of one shape [B, heads, L, D]; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    B, H, L, D = q.shape
    check_dtype("q", q)
    check_mask_dtype(attn_mask)
    if not 0 < D <= MAX_HEAD_DIM:
        raise ValueError(f"head dim {D} is not in 1..{MAX_HEAD_DIM} (the most the kernels support)")
    refuse_grad("draft_attention", q, k, v)
    sparsity, cdf_threshold = check_selection_args(sparsity, policy, cdf_threshold)
    n_visual = Geometry(grid).n_visual  # raises ValueError for a grid that is not three positive ints
    if text_len is None:
        shown = "x".join(map(str, grid))
        if L < n_visual:
            raise ValueError(f"the grid {shown} has {n_visual} tokens, more than the sequence's {L}")
        if L > n_visual:
            raise ValueError(f"the grid {shown} has {n_visual} tokens, the sequence {L}; if the other "
                             f"{L - n_visual} are text, pass text_len={L - n_visual} (and text_position), "
                             "else pass this attention's grid")
        text_len = 0
    geom = tile_layout(grid, tile, sparsity).geometry(text_len, text_position)
    geom.check_seq_len(L)
    scale = D ** -0.5 if scale is None else float(scale)

    P = None
    if sparsity == 0.0:
        kv_idx, kv_cnt = dense_indices(B, H, geom.n_tiles, q.device)
    else:
        P = score_map(q, k, geom, scale, policy)
        kv_idx, kv_cnt = select_blocks(P, sparsity, policy, cdf_threshold)

    bias = permuted_key_bias(attn_mask, B, H, geom, q.device)
    chosen = require_precision(plan(geom, q.dtype, q.device, D, B, precision=precision), precision)
    attend = dict(key_bias=bias, scale=scale, backend=chosen.backend.value, precision=precision)
    if chosen.fused:  # the fused op masks edge tiles' padding itself
        out = tiled_attention(q, k, v, kv_idx, kv_cnt, geom, visual_bias=attn_mask is not None, **attend)
    else:
        qp, kp, vp = (permute_tiles(t, geom) for t in (q, k, v))
        out = unpermute_tiles(block_sparse_attention(qp, kp, vp, kv_idx, kv_cnt, geom,
                                                     visual_bias=needs_visual_bias(attn_mask is not None, geom),
                                                     **attend), geom)
    if return_mask:
        return out, DraftBlockMask(kv_idx, kv_cnt, geom, policy, float(sparsity), draft_map=P)
    return out

