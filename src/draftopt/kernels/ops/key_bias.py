"""``draftopt::key_bias``: an SDPA key padding mask as the attention kernels' additive key bias.

The kernels take ``key_bias`` [B or 1, heads or 1, Lp] float32 in the tile-major
layout: 0 for real keys, -inf for padding rows and for keys a key padding mask
hides. A mask must only hide keys (its query dimension 1, e.g. [B, 1, 1, L] as
HunyuanVideo passes for its text); a per-query mask cannot be sparsified.

Example:
    >>> from draftopt.kernels import Geometry
    >>> from draftopt.kernels.ops.key_bias import permuted_key_bias
    >>> g = Geometry((1, 8, 16), text_len=3)
    >>> mask = torch.tensor([True] * 130 + [False])[None, None, None]
    >>> permuted_key_bias(mask, 1, 2, g, "cpu").shape
    torch.Size([1, 1, 256])
"""

from __future__ import annotations

import torch
from torch.library import triton_op

from .._utils import check_mask_dtype, make_inference_only
from ..geometry import Geometry, permuted_source_index


def check_key_padding_mask(shape: tuple, B: int, heads: int, L: int) -> None:
    """Raise ValueError unless an SDPA mask of ``shape`` only hides keys (query dim 1)."""
    full = (1,) * (4 - len(shape)) + tuple(shape)
    if len(shape) > 4 or full[2] != 1 or full[3] != L or full[0] not in (1, B) or full[1] not in (1, heads):
        raise ValueError(
            f"attn_mask of shape {tuple(shape)} is not a key padding mask for "
            f"[B={B}, heads={heads}, L={L}]: its query dimension must be 1 (e.g. [B, 1, 1, L]); "
            "draftopt cannot sparsify attention with a per-query mask"
        )


def key_padding_bias(attn_mask: torch.Tensor | None, B: int, heads: int, L: int, device) -> torch.Tensor:
    """An SDPA ``attn_mask`` that only hides keys -> additive float32 bias [B or 1, heads or 1, L].

    The mask follows SDPA's broadcasting (right-aligned to [B, heads, Lq, Lk]).
    Boolean True means "attend".
    """
    if attn_mask is None:
        return torch.zeros(1, 1, L, device=device, dtype=torch.float32)
    check_mask_dtype(attn_mask)
    check_key_padding_mask(tuple(attn_mask.shape), B, heads, L)
    m = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    m = m[:, :, 0, :]
    if m.dtype == torch.bool:
        return torch.zeros(m.shape, device=device, dtype=torch.float32).masked_fill(~m, float("-inf"))
    return m.to(torch.float32)


@triton_op("draftopt::key_bias", mutates_args=())
def _key_bias_op(
    mask: torch.Tensor | None, B: int, heads: int, T: int, H: int, W: int, th: int, tw: int, text_len: int,
    text_before: int, device: torch.device,
) -> torch.Tensor:
    """[B|1, heads|1, Lp] float32: the mask as an additive bias, -inf on padding rows."""
    geom = Geometry.from_op_args(T, H, W, th, tw, text_len, text_before)
    bias = key_padding_bias(mask, B, heads, geom.seq_len, device)
    src = permuted_source_index(geom, device)
    return torch.where(src >= 0, bias.index_select(-1, src.clamp(min=0)), float("-inf"))


make_inference_only(_key_bias_op, "key_bias")


def permuted_key_bias(attn_mask, B: int, heads: int, geom: Geometry, device) -> torch.Tensor:
    """An SDPA key padding mask (or None) laid out as the attention ops' key bias."""
    return torch.ops.draftopt.key_bias(attn_mask, B, heads, *geom.op_args(), torch.device(device))


def needs_visual_bias(has_mask: bool, geom: Geometry) -> bool:
    """Whether the key bias can be nonzero on visual key tiles: a user mask, or padding rows in edge tiles.
    Where it cannot, the kernels skip the bias add on visual tiles (text blocks always get it). This is
    ``block_sparse_attention``'s ``visual_bias``; ``tiled_attention`` takes ``has_mask`` alone (it knows
    the grid, so it masks the padding itself)."""
    return bool(has_mask) or geom.has_visual_padding
