"""Stage 1, pool: average q (or k) over each tile of each frame.

``draftopt::tile_pool(x [B, heads, L, D], geometry) -> [B, heads, S, D]`` in
float32 (float64 for float64 input on the PyTorch path). Partial tiles at the
right/bottom edge average over their real tokens only; text tokens are not
pooled.

Example:
    >>> from draftopt.kernels import Geometry, tile_pool
    >>> g = Geometry((2, 8, 16), tile=(8, 16))
    >>> tile_pool(torch.randn(1, 2, g.seq_len, 64), g).shape
    torch.Size([1, 2, 2, 64])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op

from ._common import alloc, check_dtype, launcher, make_inference_only, next_pow2, refuse_grad, use_triton
from .geometry import Geometry, tile_token_counts


@triton.jit
def _tile_pool_kernel(
    X, Out,
    stride_xb, stride_xh, stride_xl, stride_xd,
    stride_ob, stride_oh, stride_os,
    n_heads, H, W, tiles_h, tiles_w, vis_off, head_dim,
    TH: tl.constexpr, TW: tl.constexpr, TW_P2: tl.constexpr, BLOCK_D: tl.constexpr,
):
    s = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    t = s // (tiles_h * tiles_w)
    hi = (s // tiles_w) % tiles_h
    wi = s % tiles_w

    c = tl.arange(0, TW_P2)
    cols = wi * TW + c
    col_ok = (c < TW) & (cols < W)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    base = X + b * stride_xb + h * stride_xh
    n_rows = tl.minimum(TH, H - hi * TH)  # a bottom-edge tile has fewer real rows
    acc = tl.zeros([TW_P2, BLOCK_D], dtype=tl.float32)
    # Unrolled: all TH row loads are in flight at once (a runtime loop issued them one by one).
    for r in tl.static_range(TH):
        tok = (vis_off + t * H * W + (hi * TH + r) * W + cols).to(tl.int64)
        ptrs = base + tok[:, None] * stride_xl + offs_d[None, :] * stride_xd
        ok = (col_ok & (c * 0 + hi * TH + r < H))[:, None] & d_ok[None, :]
        acc += tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
    n_real = n_rows * tl.minimum(TW, W - wi * TW)
    pooled = tl.sum(acc, axis=0) / n_real.to(tl.float32)
    tl.store(Out + b * stride_ob + h * stride_oh + s * stride_os + offs_d, pooled, mask=d_ok)


def tile_pool_triton(x: torch.Tensor, geom: Geometry) -> torch.Tensor:
    """Launch the Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1)."""
    B, n_heads, _, D = x.shape
    (_, H, W), (th, tw) = geom.grid, geom.tile
    nh, nw = geom.tiles_hw
    out = alloc((B, n_heads, geom.n_tiles, D), torch.float32, x.device)
    launcher(_tile_pool_kernel)[(geom.n_tiles, B * n_heads)](
        x, out,
        *x.stride(),
        out.stride(0), out.stride(1), out.stride(2),
        n_heads, H, W, nh, nw, geom.visual_offset, D,
        TH=th, TW=tw, TW_P2=next_pow2(tw), BLOCK_D=next_pow2(D),
    )
    return out


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


@triton_op("draftopt::tile_pool", mutates_args=())
def _tile_pool_op(
    x: torch.Tensor, T: int, H: int, W: int, th: int, tw: int, text_len: int, text_first: bool
) -> torch.Tensor:
    geom = Geometry.from_op_args(T, H, W, th, tw, text_len, text_first)
    if use_triton(x):
        return tile_pool_triton(x, geom)
    return tile_pool_reference(x, geom)


make_inference_only(_tile_pool_op, "tile_pool")


def tile_pool(x: torch.Tensor, geom: Geometry) -> torch.Tensor:
    """Average ``x`` [B, heads, L, D] over each tile of ``geom``: [B, heads, S, D] float32."""
    if x.dim() != 4:
        raise ValueError(f"tile_pool expects [B, heads, L, D], got shape {tuple(x.shape)}")
    geom.check_seq_len(x.shape[2], "tile_pool input")
    if use_triton(x):
        check_dtype("tile_pool input", x)
    refuse_grad("tile_pool", x)
    return torch.ops.draftopt.tile_pool(x, *geom.op_args())
