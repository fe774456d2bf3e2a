"""Stages 3 and 5, permute / unpermute: tile-major token order and back.

``draftopt::permute_tiles(x [B, heads, L, D], geometry, pad_value)`` returns the
padded tile-major layout [B, heads, Lp, D] described in ``geometry.py`` (each
tile one contiguous block, text in its own blocks at the end, padding rows set
to ``pad_value``); ``draftopt::unpermute_tiles`` maps [B, heads, Lp, D] back to
[B, heads, L, D] and drops the padding. Both are one row-gather kernel driven
by an index built with arange arithmetic on the device (no host sync).

Example:
    >>> from draftopt.kernels import Geometry, permute_tiles, unpermute_tiles
    >>> g = Geometry((3, 13, 27), tile=(8, 16), text_len=7, text_position="start")
    >>> x = torch.randn(2, 3, g.seq_len, 64)
    >>> torch.equal(unpermute_tiles(permute_tiles(x, g), g), x)
    True
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ._common import alloc, launcher, make_inference_only, next_pow2, refuse_grad, use_triton
from .geometry import Geometry, original_to_permuted_index, permuted_source_index

# 64 rows x 128 columns of bf16 per program: 16 KB, enough bytes in flight per
# SM for a plain copy kernel.
_BLOCK_ROWS = 64


@triton.jit
def _gather_rows_kernel(
    X, Idx, Out,
    stride_xb, stride_xh, stride_xl, stride_xd,
    stride_ob, stride_oh, stride_ol,
    n_heads, n_rows, head_dim, pad_value,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Out[b, h, r, :] = X[b, h, Idx[r], :], or pad_value where Idx[r] < 0."""
    pid_r = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < n_rows
    src = tl.load(Idx + rows, mask=r_ok, other=-1)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    x_ptrs = X + b * stride_xb + h * stride_xh + src[:, None] * stride_xl + offs_d[None, :] * stride_xd
    pad = tl.cast(pad_value, X.dtype.element_ty)  # Inductor passes Python floats as fp64
    vals = tl.load(x_ptrs, mask=(src >= 0)[:, None] & d_ok[None, :], other=pad)
    o_ptrs = Out + b * stride_ob + h * stride_oh + rows.to(tl.int64)[:, None] * stride_ol + offs_d[None, :]
    tl.store(o_ptrs, vals.to(Out.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])


def gather_rows_triton(x: torch.Tensor, idx: torch.Tensor, pad_value: float = 0.0,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """out[..., r, :] = x[..., idx[r], :] (pad_value where idx[r] < 0), one Triton launch.

    ``out`` (optional): the [B, heads, rows, D] tensor to write, any strides with a contiguous last dim.
    """
    B, n_heads, _, D = x.shape
    n_rows = idx.numel()
    if out is None:
        out = alloc((B, n_heads, n_rows, D), x.dtype, x.device)
    grid = (triton.cdiv(n_rows, _BLOCK_ROWS), B * n_heads)
    launcher(_gather_rows_kernel)[grid](
        x, idx, out,
        *x.stride(),
        out.stride(0), out.stride(1), out.stride(2),
        n_heads, n_rows, D, pad_value,
        BLOCK_R=_BLOCK_ROWS, BLOCK_D=max(16, next_pow2(D)),
    )
    return out


def gather_rows_reference(x: torch.Tensor, idx: torch.Tensor, pad_value: float = 0.0) -> torch.Tensor:
    out = x.index_select(2, idx.clamp(min=0))
    return torch.where((idx >= 0)[:, None], out, torch.tensor(pad_value, dtype=x.dtype, device=x.device))


def _gather(x, idx, pad_value):
    return gather_rows_triton(x, idx, pad_value) if use_triton(x) else gather_rows_reference(x, idx, pad_value)


@triton_op("draftopt::permute_tiles", mutates_args=())
def _permute_op(
    x: torch.Tensor, T: int, H: int, W: int, th: int, tw: int, text_len: int, text_first: bool,
    pad_value: float,
) -> torch.Tensor:
    geom = Geometry.from_op_args(T, H, W, th, tw, text_len, text_first)
    return _gather(x, permuted_source_index(geom, x.device), pad_value)


@triton_op("draftopt::unpermute_tiles", mutates_args=())
def _unpermute_op(
    x: torch.Tensor, T: int, H: int, W: int, th: int, tw: int, text_len: int, text_first: bool
) -> torch.Tensor:
    geom = Geometry.from_op_args(T, H, W, th, tw, text_len, text_first)
    return _gather(x, original_to_permuted_index(geom, x.device), 0.0)


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
