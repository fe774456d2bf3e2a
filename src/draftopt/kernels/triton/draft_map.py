"""Stage 2a on the GPU: the draft map softmax(q_pool k_pool^T * scale), one fused kernel.

Two passes over the key tiles per block of query rows: the row max and
normalizer, then the normalized probabilities. Policy "mass" (ops/block_mass.py)
adds a few extra features to each side and weights each row: they go in as a
second, narrow product (``q_extra``, ``k_extra``) and a row factor, so the
D-wide product keeps its power-of-two width (D + 4 features padded to 256
columns made block_mass 0.62 ms at Wan2.1-14B 720p: docs/design.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._utils import LOG2E
from ._common import launcher, next_pow2


@triton.jit
def _scores(q, qe, k_base, ke_base, cols, S, stride_ks, stride_kes, offs_d, d_ok, offs_e, e_ok, qk_scale,
            HAS_EXTRA: tl.constexpr):
    """[BLOCK_M, BLOCK_N] logits (log2 units) of the key tiles ``cols``: q . k, plus qe . ke."""
    k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :], mask=(cols < S)[:, None] & d_ok[None, :],
                other=0.0)
    s = tl.dot(q, tl.trans(k))
    if HAS_EXTRA:
        ke = tl.load(ke_base + cols[:, None] * stride_kes + offs_e[None, :],
                     mask=(cols < S)[:, None] & e_ok[None, :], other=0.0)
        s += tl.dot(qe, tl.trans(ke))
    return s * qk_scale


@triton.jit
def _draft_map_kernel(
    Q, K, QE, KE, ROW_W, P,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_qeb, stride_qeh, stride_qes,
    stride_keb, stride_keh, stride_kes,
    stride_pb, stride_ph, stride_ps,
    n_heads, S, head_dim, n_extra, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    HAS_EXTRA: tl.constexpr, ROW_WEIGHT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    offs_e = tl.arange(0, BLOCK_E)
    e_ok = offs_e < n_extra
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qs + offs_d[None, :],
                mask=(rows < S)[:, None] & d_ok[None, :], other=0.0)
    qe = q  # unread without extra features
    if HAS_EXTRA:
        qe = tl.load(QE + b * stride_qeb + h * stride_qeh + rows[:, None] * stride_qes + offs_e[None, :],
                     mask=(rows < S)[:, None] & e_ok[None, :], other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    ke_base = KE + b * stride_keb + h * stride_keh
    qk_scale = tl.cast(qk_scale, tl.float32)  # Inductor passes Python floats as fp64
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, S, BLOCK_N):  # pass 1: row max and normalizer
        cols = n0 + tl.arange(0, BLOCK_N)
        s = _scores(q, qe, k_base, ke_base, cols, S, stride_ks, stride_kes, offs_d, d_ok, offs_e, e_ok, qk_scale,
                    HAS_EXTRA)
        s = tl.where((cols < S)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m_i = m_new
    inv = 1.0 / l_i
    if ROW_WEIGHT:  # block_mass: row i of the softmax times tile i's token count
        inv *= tl.load(ROW_W + rows, mask=rows < S, other=0.0)
    p_base = P + b * stride_pb + h * stride_ph + rows[:, None] * stride_ps
    for n0 in range(0, S, BLOCK_N):  # pass 2: normalized probabilities
        cols = n0 + tl.arange(0, BLOCK_N)
        s = _scores(q, qe, k_base, ke_base, cols, S, stride_ks, stride_kes, offs_d, d_ok, offs_e, e_ok, qk_scale,
                    HAS_EXTRA)
        p = tl.exp2(s - m_i[:, None]) * inv[:, None]
        tl.store(p_base + cols[None, :], p, mask=(rows < S)[:, None] & (cols < S)[None, :])


def draft_map_triton(q_pool: torch.Tensor, k_pool: torch.Tensor, scale: float, q_extra: torch.Tensor | None = None,
                     k_extra: torch.Tensor | None = None, row_weight: torch.Tensor | None = None) -> torch.Tensor:
    """q_pool, k_pool [B, heads, S, D] -> P [B, heads, S, S] float32: softmax over keys of
    (q_pool . k_pool + q_extra . k_extra) * scale, row i times ``row_weight[i]`` (both optional; the extras
    [B, heads, S, E], E <= 16)."""
    B, H, S, D = q_pool.shape
    q_pool, k_pool = q_pool.float().contiguous(), k_pool.float().contiguous()
    has_extra = q_extra is not None
    if has_extra:
        q_extra, k_extra = q_extra.float().contiguous(), k_extra.float().contiguous()
        if q_extra.shape[-1] > 16 or q_extra.shape != k_extra.shape:
            raise RuntimeError(f"draftopt internal error: extra features {tuple(q_extra.shape)}, "
                               f"{tuple(k_extra.shape)} (at most 16, one shape)")
    else:
        q_extra = k_extra = q_pool  # unread
    weight = row_weight.float().contiguous() if row_weight is not None else q_pool  # unread without it
    out = torch.empty((B, H, S, S), dtype=torch.float32, device=q_pool.device)
    block_d = max(16, next_pow2(D))
    block = 64 if block_d <= 128 else 32  # keep the [block, block_d] tiles in registers
    launcher(_draft_map_kernel)[(triton.cdiv(S, block), B * H)](
        q_pool, k_pool, q_extra, k_extra, weight, out,
        q_pool.stride(0), q_pool.stride(1), q_pool.stride(2),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        q_extra.stride(0), q_extra.stride(1), q_extra.stride(2),
        k_extra.stride(0), k_extra.stride(1), k_extra.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        H, S, D, q_extra.shape[-1] if has_extra else 0, scale * LOG2E,
        BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d, BLOCK_E=16, HAS_EXTRA=has_extra,
        ROW_WEIGHT=row_weight is not None,
    )
    return out
