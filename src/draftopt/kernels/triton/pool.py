"""Stage 1 on the GPU: average q or k over each tile of each frame (one program per tile and head).

With ``SPREAD`` the kernel also writes each tile's spread, the variance of its
tokens around the tile mean averaged over the head dim (policy "mass"), from
the same loads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..geometry import Geometry
from ._common import launcher, next_pow2, tile_coords


@triton.jit
def _tile_pool_kernel(
    X, Out, Spread,
    stride_xb, stride_xh, stride_xl, stride_xd,
    stride_ob, stride_oh, stride_os,
    n_heads, n_tiles, H, W, tiles_w, tiles_hw, vis_off, head_dim,
    TH: tl.constexpr, TW: tl.constexpr, TW_P2: tl.constexpr, BLOCK_D: tl.constexpr, SPREAD: tl.constexpr,
):
    s = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    t, hi, wi = tile_coords(s, tiles_w, tiles_hw)

    c = tl.arange(0, TW_P2)
    cols = wi * TW + c
    col_ok = (c < TW) & (cols < W)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    base = X + b * stride_xb + h * stride_xh
    n_rows = tl.minimum(TH, H - hi * TH)  # a bottom-edge tile has fewer real rows
    acc = tl.zeros([TW_P2, BLOCK_D], dtype=tl.float32)
    sq = tl.zeros([TW_P2, BLOCK_D], dtype=tl.float32)
    # Unrolled: all TH row loads are in flight at once (a runtime loop issued them one by one).
    for r in tl.static_range(TH):
        tok = (vis_off + t * H * W + (hi * TH + r) * W + cols).to(tl.int64)
        ptrs = base + tok[:, None] * stride_xl + offs_d[None, :] * stride_xd
        ok = (col_ok & (c * 0 + hi * TH + r < H))[:, None] & d_ok[None, :]
        x = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
        acc += x
        if SPREAD:
            sq += x * x
    n_real = (n_rows * tl.minimum(TW, W - wi * TW)).to(tl.float32)
    pooled = tl.sum(acc, axis=0) / n_real
    tl.store(Out + b * stride_ob + h * stride_oh + s * stride_os + offs_d, pooled, mask=d_ok)
    if SPREAD:
        # E|x|^2 - |E x|^2 over the tile, per dim; float32 sums of O(1) activations lose no ranking.
        var = (tl.sum(tl.sum(sq, axis=0), axis=0) / n_real - tl.sum(pooled * pooled, axis=0)) / head_dim
        tl.store(Spread + bh.to(tl.int64) * n_tiles + s, tl.maximum(var, 0.0))


def _launch(x: torch.Tensor, geom: Geometry, spread: torch.Tensor | None) -> torch.Tensor:
    B, n_heads, _, D = x.shape
    (_, H, W), (th, tw) = geom.grid, geom.tile
    nh, nw = geom.tiles_hw
    out = torch.empty((B, n_heads, geom.n_tiles, D), dtype=torch.float32, device=x.device)
    launcher(_tile_pool_kernel)[(geom.n_tiles, B * n_heads)](
        x, out, out if spread is None else spread,
        *x.stride(),
        out.stride(0), out.stride(1), out.stride(2),
        n_heads, geom.n_tiles, H, W, nw, nh * nw, geom.visual_offset, D,
        TH=th, TW=tw, TW_P2=next_pow2(tw), BLOCK_D=next_pow2(D), SPREAD=spread is not None,
        # 2 warps: more programs resident to keep loads in flight. H200, one [1, 40, 75600, 128] bf16 tensor's
        # moments: 273 us (2.84 TB/s) against 306 with 4 warps, 505 with 8; 128-token strips 243 against 330.
        num_warps=2,
    )
    return out


def tile_pool_triton(x: torch.Tensor, geom: Geometry) -> torch.Tensor:
    """x [B, heads, L, D] -> [B, heads, S, D] float32 (CUDA, or CPU under TRITON_INTERPRET=1)."""
    return _launch(x, geom, None)


def tile_moments_triton(x: torch.Tensor, geom: Geometry) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, heads, L, D] -> (tile means [B, heads, S, D], tile spreads [B, heads, S]), float32."""
    B, n_heads = x.shape[:2]
    spread = torch.empty((B, n_heads, geom.n_tiles), dtype=torch.float32, device=x.device)
    return _launch(x, geom, spread), spread
