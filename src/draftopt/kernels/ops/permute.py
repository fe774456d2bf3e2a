"""Stages 3 and 5, permute / unpermute: ``draftopt::permute_tiles`` and ``draftopt::unpermute_tiles``.

``permute_tiles(x [B, heads, L, D], geometry, pad_value)`` returns the padded
tile-major layout [B, heads, Lp, D] described in ``geometry.py`` (each tile one
contiguous block, text in its own blocks at the end, padding rows set to
``pad_value``); ``unpermute_tiles`` maps [B, heads, Lp, D] back to
[B, heads, L, D] and drops the padding. Both are one row gather driven by an
index built with arange arithmetic on the device (no host sync).

Example:
    >>> from draftopt.kernels import Geometry, permute_tiles, unpermute_tiles
    >>> g = Geometry((3, 13, 27), tile=(8, 16), text_len=7, text_position="start")
    >>> x = torch.randn(2, 3, g.seq_len, 64)
    >>> torch.equal(unpermute_tiles(permute_tiles(x, g), g), x)
    True
"""

from __future__ import annotations

import torch
from torch.library import triton_op

from .._utils import make_inference_only, refuse_grad
from ..dispatch import Backend, stage_backend
from ..geometry import Geometry, original_to_permuted_index, permuted_source_index
from ..triton.gather import gather_rows_triton


def gather_rows_reference(x: torch.Tensor, idx: torch.Tensor, pad_value: float = 0.0) -> torch.Tensor:
    """out[..., r, :] = x[..., idx[r], :], pad_value where idx[r] < 0."""
    out = x.index_select(2, idx.clamp(min=0))
    return torch.where((idx >= 0)[:, None], out, torch.tensor(pad_value, dtype=x.dtype, device=x.device))


def gather_rows(x: torch.Tensor, idx: torch.Tensor, pad_value: float = 0.0) -> torch.Tensor:
    if stage_backend(x) is Backend.TRITON:
        return gather_rows_triton(x, idx, pad_value)
    return gather_rows_reference(x, idx, pad_value)


@triton_op("draftopt::permute_tiles", mutates_args=())
def _permute_op(
    x: torch.Tensor, T: int, H: int, W: int, th: int, tw: int, text_len: int, text_before: int,
    pad_value: float,
) -> torch.Tensor:
    geom = Geometry.from_op_args(T, H, W, th, tw, text_len, text_before)
    return gather_rows(x, permuted_source_index(geom, x.device), pad_value)


@triton_op("draftopt::unpermute_tiles", mutates_args=())
def _unpermute_op(
    x: torch.Tensor, T: int, H: int, W: int, th: int, tw: int, text_len: int, text_before: int
) -> torch.Tensor:
    geom = Geometry.from_op_args(T, H, W, th, tw, text_len, text_before)
    return gather_rows(x, original_to_permuted_index(geom, x.device), 0.0)


make_inference_only(_permute_op, "permute_tiles")
make_inference_only(_unpermute_op, "unpermute_tiles")


def _check(x, geom, n, what):
    if x.dim() != 4:
        raise ValueError(f"{what} expects [B, heads, L, D], got shape {tuple(x.shape)}")
    if x.shape[2] != n:
        raise ValueError(f"{what} input has {x.shape[2]} tokens, the geometry ({geom}) says {n}")


def permute_tiles(x: torch.Tensor, geom: Geometry, pad_value: float = 0.0) -> torch.Tensor:
    """[B, heads, L, D] in original order -> [B, heads, Lp, D] tile-major, padding = pad_value."""
    _check(x, geom, geom.seq_len, "permute_tiles")
    refuse_grad("permute_tiles", x)
    return torch.ops.draftopt.permute_tiles(x, *geom.op_args(), float(pad_value))


def unpermute_tiles(x: torch.Tensor, geom: Geometry) -> torch.Tensor:
    """[B, heads, Lp, D] tile-major -> [B, heads, L, D] original order, padding dropped."""
    _check(x, geom, geom.padded_len, "unpermute_tiles")
    refuse_grad("unpermute_tiles", x)
    return torch.ops.draftopt.unpermute_tiles(x, *geom.op_args())
