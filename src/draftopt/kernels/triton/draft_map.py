"""Stage 2a on the GPU: the draft map softmax(q_pool k_pool^T * scale), one fused kernel.

Two passes over the key tiles per block of query rows: the row max and
normalizer, then the normalized probabilities.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._utils import LOG2E
from ._common import launcher, next_pow2


@triton.jit
def _draft_map_kernel(
    Q, K, P,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_pb, stride_ph, stride_ps,
    n_heads, S, head_dim, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qs + offs_d[None, :],
                mask=(rows < S)[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    qk_scale = tl.cast(qk_scale, tl.float32)  # Inductor passes Python floats as fp64
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, S, BLOCK_N):  # pass 1: row max and normalizer
        cols = n0 + tl.arange(0, BLOCK_N)
        k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :],
                    mask=(cols < S)[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where((cols < S)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m_i = m_new
    p_base = P + b * stride_pb + h * stride_ph + rows[:, None] * stride_ps
    for n0 in range(0, S, BLOCK_N):  # pass 2: normalized probabilities
        cols = n0 + tl.arange(0, BLOCK_N)
        k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :],
                    mask=(cols < S)[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.exp2(s - m_i[:, None]) / l_i[:, None]
        tl.store(p_base + cols[None, :], p, mask=(rows < S)[:, None] & (cols < S)[None, :])


def draft_map_triton(q_pool: torch.Tensor, k_pool: torch.Tensor, scale: float) -> torch.Tensor:
    """q_pool, k_pool [B, heads, S, D] -> P [B, heads, S, S] float32."""
    B, H, S, D = q_pool.shape
    q_pool, k_pool = q_pool.float().contiguous(), k_pool.float().contiguous()
    out = torch.empty((B, H, S, S), dtype=torch.float32, device=q_pool.device)
    block_d = max(16, next_pow2(D))
    block = 64 if block_d <= 128 else 32  # block_mass's D + 4 features: keep the [block, block_d] tiles in registers
    launcher(_draft_map_kernel)[(triton.cdiv(S, block), B * H)](
        q_pool, k_pool, out,
        q_pool.stride(0), q_pool.stride(1), q_pool.stride(2),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        H, S, D, scale * LOG2E,
        BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d,
    )
    return out
