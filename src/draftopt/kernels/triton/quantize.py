"""FP8 operands of the Hopper FP8 attention kernel, in two Triton launches (``fp8_operands_triton``).

From q, k, v in the original token order (any strides) to tile-major e4m3
copies, the layout the kernel reads (``ops/quantize.py`` has the same math in
PyTorch, the reference and the CPU path):

1. ``_kv_stats_kernel``: per chunk of tokens and channel, the sum, minimum and
   maximum of k and the largest |v| (finite values only), so that one pass over
   k gives both its mean and the largest |k - mean|;
2. ``_quantize_kernel``, once for each of q, k, v: per tile-major block, q with its own scale (the
   block's largest |q| / 448), k minus its per-channel mean over the head
   (SageAttention's smoothing: a constant key vector moves every score of a
   query row by one number, so the softmax is unchanged, and the quantized
   part shrinks) and v, each head's k and v with one scale; v is written
   transposed (V^T [B, heads, D, Lp]), as FP8 wgmma reads its B operand K-major,
   its tokens in the kernel's key order within each 16 (``ops/quantize.py``,
   ``fp8_key_order``).

Scales keep each tensor inside e4m3's range (|x| <= 448); e4m3 is a float
format, so a coarser scale costs no relative precision above 2**-6 * scale.
Non-finite values are left out of every statistic: a NaN stays in its own
rows, as in dense attention; an Inf saturates to +-448 * scale (the cast is
saturating on Hopper, as in PyTorch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import launcher, next_pow2

E4M3_MAX = 448.0
_STAT_ROWS = 128  # tokens per program of the statistics pass


@triton.jit
def _kv_stats_kernel(K, V, Stats, stride_kb, stride_kh, stride_kl, stride_kd, stride_vb, stride_vh, stride_vl,
                     stride_vd, n_heads, L, D, n_chunks, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Stats[0..3, bh, chunk, :] = sum k, min k, max k, max |v| over the chunk's finite values."""
    chunk = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    rows = chunk * ROWS + tl.arange(0, ROWS)
    d = tl.arange(0, BLOCK_D)
    ok = (rows < L)[:, None] & (d < D)[None, :]
    k = tl.load(K + b * stride_kb + h * stride_kh + rows[:, None].to(tl.int64) * stride_kl + d[None, :] * stride_kd,
                mask=ok, other=0.0).to(tl.float32)
    v = tl.load(V + b * stride_vb + h * stride_vh + rows[:, None].to(tl.int64) * stride_vl + d[None, :] * stride_vd,
                mask=ok, other=0.0).to(tl.float32)
    k_ok = ok & (tl.abs(k) < float("inf"))  # False for NaN too
    v_ok = ok & (tl.abs(v) < float("inf"))
    out = Stats + (bh * n_chunks + chunk).to(tl.int64) * BLOCK_D + d
    plane = tl.num_programs(1).to(tl.int64) * n_chunks * BLOCK_D  # one statistic's [BH, chunks, BLOCK_D]
    tl.store(out, tl.sum(tl.where(k_ok, k, 0.0), axis=0))
    tl.store(out + plane, tl.min(tl.where(k_ok, k, float("inf")), axis=0))
    tl.store(out + 2 * plane, tl.max(tl.where(k_ok, k, float("-inf")), axis=0))
    tl.store(out + 3 * plane, tl.max(tl.where(v_ok, tl.abs(v), 0.0), axis=0))


@triton.jit
def _scale_of(amax):
    """The scale that maps amax to e4m3's largest number (1 where nothing is finite and nonzero)."""
    return tl.where(amax > 0.0, tl.math.div_rn(amax, 448.0), 1.0)


@triton.jit
def _quantize_kernel(X, Src, Mean, Scale, Out, stride_xb, stride_xh, stride_xl, stride_xd, n_heads, D, Lp,
                     KIND: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Tile-major block ``j`` of one head of q (KIND 0: its own scale, stored in Scale [BH, Lp / BLOCK]),
    k (1: minus Mean [BH, BLOCK_D], the head's scale) or v (2: the head's scale, stored transposed)."""
    j = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    rows = j * BLOCK + tl.arange(0, BLOCK)
    if KIND == 2:  # V^T's column c holds token fp8_key_order(c): read the rows in that order, store contiguously
        r = rows % 16
        src = tl.load(Src + rows - r + 8 * ((r // 2) % 2) + 2 * (r // 4) + r % 2)
    else:
        src = tl.load(Src + rows)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    ok = (src >= 0)[:, None] & d_ok[None, :]
    x = tl.load(X + b * stride_xb + h * stride_xh + src[:, None].to(tl.int64) * stride_xl + d[None, :] * stride_xd,
                mask=ok, other=0.0).to(tl.float32)
    if KIND == 0:
        scale = _scale_of(tl.max(tl.max(tl.where(tl.abs(x) < float("inf"), tl.abs(x), 0.0), axis=1), axis=0))
        tl.store(Scale + bh * (Lp // BLOCK) + j, scale)
    else:
        scale = tl.load(Scale + bh)
    if KIND == 1:
        x = tl.where(ok, x - tl.load(Mean + bh * BLOCK_D + d)[None, :], 0.0)
    x8 = tl.math.div_rn(x, scale).to(tl.float8e4nv)
    base = bh.to(tl.int64) * Lp * D
    if KIND == 2:  # V^T: this block's tokens are columns of [D, Lp] (read in the key order above)
        tl.store(Out + base + d[:, None].to(tl.int64) * Lp + rows[None, :], tl.trans(x8), mask=d_ok[:, None])
    else:
        tl.store(Out + base + rows[:, None].to(tl.int64) * D + d[None, :], x8, mask=d_ok[None, :])


def kv_scales(stats: torch.Tensor, L: int):
    """(k mean [BH, BLOCK_D], k scale [BH], v scale [BH]) from the statistics pass's partials [4, BH, chunks, BLOCK_D]."""
    k_mean = stats[0].sum(1) / L
    k_dev = torch.maximum(stats[2].amax(1) - k_mean, k_mean - stats[1].amin(1)).amax(-1)
    v_amax = stats[3].amax(1).amax(-1)
    return (k_mean, *(torch.where(a > 0, a / E4M3_MAX, torch.ones_like(a)) for a in (k_dev, v_amax)))


def fp8_operands_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, src: torch.Tensor, block: int):
    """(q8, k8, vt8, q_scale, k_scale, v_scale): see the module doc. q, k, v [B, heads, L, D] in any strides;
    ``src`` the tile-major layout's source rows (``geometry.permuted_source_index``, -1 for padding)."""
    B, H, L, D = q.shape
    Lp = src.numel()
    BD = max(16, next_pow2(D))
    n_chunks = triton.cdiv(L, _STAT_ROWS)
    stats = torch.empty((4, B * H, n_chunks, BD), dtype=torch.float32, device=q.device)
    launcher(_kv_stats_kernel)[(n_chunks, B * H)](k, v, stats, *k.stride(), *v.stride(), H, L, D, n_chunks,
                                                  ROWS=_STAT_ROWS, BLOCK_D=BD)
    k_mean, k_scale, v_scale = kv_scales(stats, L)
    q8 = torch.empty((B, H, Lp, D), dtype=torch.float8_e4m3fn, device=q.device)
    k8 = torch.empty_like(q8)
    vt8 = torch.empty((B, H, D, Lp), dtype=torch.float8_e4m3fn, device=q.device)
    q_scale = torch.empty((B, H, Lp // block), dtype=torch.float32, device=q.device)
    # One launch per tensor: a program holds one [block, D] tile in registers, not three.
    for kind, (x, scale, out) in enumerate(((q, q_scale, q8), (k, k_scale, k8), (v, v_scale, vt8))):
        launcher(_quantize_kernel)[(Lp // block, B * H)](x, src, k_mean, scale, out, *x.stride(), H, D, Lp,
                                                         KIND=kind, BLOCK=block, BLOCK_D=BD, num_warps=8)
    return q8, k8, vt8, q_scale, k_scale.view(B, H), v_scale.view(B, H)
