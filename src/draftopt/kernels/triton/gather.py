"""Stages 3 and 5 on the GPU: one row-gather kernel (tile-major order and back)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import launcher, next_pow2

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
        out = torch.empty((B, n_heads, n_rows, D), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n_rows, _BLOCK_ROWS), B * n_heads)
    launcher(_gather_rows_kernel)[grid](
        x, idx, out,
        *x.stride(),
        out.stride(0), out.stride(1), out.stride(2),
        n_heads, n_rows, D, pad_value,
        BLOCK_R=_BLOCK_ROWS, BLOCK_D=max(16, next_pow2(D)),
    )
    return out
