"""Stage 4 on any CUDA GPU: the Triton block-sparse flash attention kernel (and stages 3-5 in place).

One program computes BLOCK_M query rows of one query block with an online
softmax in float32 (FlashAttention-2 style, exp2, ``tl.dot`` on [BLOCK, D]
tiles). A visual query tile attends to its selected key tiles and to every text
block; a text query block attends to every block; ``key_bias`` is added to text
keys always and to visual keys when ``VISUAL_BIAS`` (nothing else can mask
them). A row whose keys are all masked returns zeros rather than NaN.

Two layouts: tile-major copies (``block_sparse_attention_triton``) or q, k, v in
the original token order with any strides, each tile read where it lies and the
output rows written back in place (``tiled_attention_triton``; the box order of
the tile-major layout makes a tile one scalar base, see geometry.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._utils import LOG2E
from ..geometry import Geometry
from ._common import launcher, next_pow2, tile_coords


@triton.jit
def _text_block(t, n_pre_blocks, pre_len, suf_off, suf_len, BLOCK: tl.constexpr):
    """Text block t in place: (its first row in the original sequence, its real rows)."""
    pre = t < n_pre_blocks
    seg = tl.where(pre, t, t - n_pre_blocks).to(tl.int64) * BLOCK
    return tl.where(pre, seg, suf_off + seg), tl.where(pre, pre_len, suf_len) - seg


@triton.jit
def _tile_origin(kb, nw, nhw, th, tw, H, W, vis_off):
    """Visual tile ``kb`` in the original order: (token row of its first row, rows and columns left in the frame)."""
    t, i, j = tile_coords(kb, nw, nhw)
    base = vis_off + t.to(tl.int64) * H * W + (i * th).to(tl.int64) * W + j * tw
    return base, H - i * th, W - j * tw


@triton.jit
def _attend_block(
    acc, l_i, m_i, q, K_blk, V_blk, k_offs, v_offs, Bias_blk, step, pa, pb, a_step, lim_a, lim_b,
    stride_kl, stride_vl, offs_n, d_ok, qk_scale,
    BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    APPLY_BIAS: tl.constexpr, ROW_MASK: tl.constexpr,
):
    """Fold one key block (BLOCK keys, BLOCK_N at a time) into the running softmax.

    ``K_blk`` / ``V_blk`` point at the block's first row and ``k_offs`` / ``v_offs``
    are its rows' offsets, computed once per program, so a block costs one
    scalar base: sub-tile ``n`` starts ``n * step`` rows later. With ROW_MASK a
    row is real where ``pa + n * a_step < lim_a`` and ``pb < lim_b`` (a tile's
    box clipped by the frame edge, or the end of the text). Without a bias the
    scale is folded into one multiply-add per score (as FlashAttention does);
    with one, a row whose keys are all masked so far keeps m = -inf.
    """
    for n0 in tl.static_range(0, BLOCK, BLOCK_N):
        shift = (n0 // BLOCK_N) * step
        kp = K_blk + shift * stride_kl + k_offs
        vp = V_blk + shift * stride_vl + v_offs
        if ROW_MASK:
            ok = ((pa + (n0 // BLOCK_N) * a_step < lim_a) & (pb < lim_b))[:, None] & d_ok[None, :]
            k = tl.load(kp, mask=ok, other=0.0)
        elif EVEN_D:
            k = tl.load(kp)
        else:
            k = tl.load(kp, mask=d_ok[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if APPLY_BIAS:
            # qk_scale and the bias are both in log2 units: exp2 below.
            bias = tl.load(Bias_blk + n0 + offs_n)
            s = qk * qk_scale + bias[None, :] * 1.4426950408889634
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no live key yet
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, axis=1) * qk_scale)
            p = tl.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if ROW_MASK:
            v = tl.load(vp, mask=ok, other=0.0)
        elif EVEN_D:
            v = tl.load(vp)
        else:
            v = tl.load(vp, mask=d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _block_sparse_attn_kernel(
    Q, K, V, Out, Bias, KvIdx, KvCnt,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_bb, stride_bh,
    stride_ib, stride_ih, stride_is,
    stride_cb, stride_ch,
    n_heads, n_tiles, n_text_blocks, head_dim, qk_scale,
    H, W, th, tw, nw, nhw, vis_off, pre_len, n_pre_blocks, suf_off, suf_len,
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, VISUAL_BIAS: tl.constexpr,
    IN_PLACE: tl.constexpr, VISUAL_PAD: tl.constexpr, TEXT_PAD: tl.constexpr,
):
    # One program: BLOCK_M query rows of one query block (BLOCK rows = one tile).
    # IN_PLACE: q, k, v, out in the original token order ([B, heads, L, D], any
    # strides), each tile read where it lies (tile-major layout: see geometry.py);
    # else tile-major copies. VISUAL_PAD / TEXT_PAD: such blocks hold padding rows.
    # In place, text blocks [0, n_pre_blocks) hold the pre_len tokens before the grid (rows 0 on),
    # the others the suf_len tokens after it (rows suf_off on): each block one contiguous range.
    pid = tl.program_id(0)
    pid_m = pid // (BLOCK // BLOCK_M)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    is_text = pid_m >= n_tiles

    # Row offsets inside a key block, computed once: contiguous rows (tile-major
    # blocks, text) and a tile's box in the original layout (th rows of tw tokens, W apart).
    cont_k = offs_n[:, None] * stride_kl + offs_d[None, :] * stride_kd
    cont_v = offs_n[:, None] * stride_vl + offs_d[None, :] * stride_vd
    if IN_PLACE:
        pa = offs_n // tw
        pb = offs_n % tw
        box_k = (pa * W + pb)[:, None] * stride_kl + offs_d[None, :] * stride_kd
        box_v = (pa * W + pb)[:, None] * stride_vl + offs_d[None, :] * stride_vd
        a_step = BLOCK_N // tw
        box_step = a_step * W
    else:
        pa = offs_n
        pb = offs_n * 0
        box_k = cont_k
        box_v = cont_v
        a_step = BLOCK_N
        box_step = BLOCK_N

    # This program's query rows, and where they live.
    r = (pid % (BLOCK // BLOCK_M)) * BLOCK_M + tl.arange(0, BLOCK_M)
    if IN_PLACE:
        tb = pid_m - n_tiles
        vbase, lim_a, lim_b = _tile_origin(tl.minimum(pid_m, n_tiles - 1), nw, nhw, th, tw, H, W, vis_off)
        t_base, t_rows = _text_block(tb, n_pre_blocks, pre_len, suf_off, suf_len, BLOCK)
        q_rows = tl.where(is_text, t_base + r, vbase + (r // tw) * W + r % tw)
        q_ok = tl.where(is_text, r < t_rows, (r // tw < lim_a) & (r % tw < lim_b))
    else:
        q_rows = pid_m.to(tl.int64) * BLOCK + r
        q_ok = r < BLOCK
    q = tl.load(Q + b * stride_qb + h * stride_qh + q_rows[:, None] * stride_ql + offs_d[None, :] * stride_qd,
                mask=q_ok[:, None] & d_ok[None, :], other=0.0)
    K_bh = K + b * stride_kb + h * stride_kh
    qk_scale = tl.cast(qk_scale, tl.float32)  # Inductor passes Python floats as fp64
    V_bh = V + b * stride_vb + h * stride_vh
    Bias_bh = Bias + b * stride_bb + h * stride_bh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Visual key tiles: the selected list for a visual query tile, all tiles for text.
    row = tl.minimum(pid_m, n_tiles - 1)
    cnt = tl.load(KvCnt + b * stride_cb + h * stride_ch + row)
    n_keys = tl.where(is_text, n_tiles, cnt)
    idx_row = KvIdx + b * stride_ib + h * stride_ih + row * stride_is
    for j in range(0, n_keys):
        kb = tl.load(idx_row + j, mask=j < cnt, other=0)
        kb = tl.where(is_text, j, kb)
        if IN_PLACE:
            base, ka, kc = _tile_origin(kb, nw, nhw, th, tw, H, W, vis_off)
        else:
            base, ka, kc = kb.to(tl.int64) * BLOCK, BLOCK, 1
        acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, K_bh + base * stride_kl, V_bh + base * stride_vl,
                                      box_k, box_v, Bias_bh + kb * BLOCK, box_step, pa, pb, a_step, ka, kc,
                                      stride_kl, stride_vl, offs_n, d_ok, qk_scale,
                                      BLOCK, BLOCK_N, EVEN_D, DOT_PRECISION, VISUAL_BIAS, IN_PLACE and VISUAL_PAD)
    # Text key blocks: every query attends to them; their bias (padding, key mask) always applies.
    for t in range(0, n_text_blocks):
        if IN_PLACE:
            base, t_rows = _text_block(t, n_pre_blocks, pre_len, suf_off, suf_len, BLOCK)
        else:
            base, t_rows = (n_tiles + tl.cast(t, tl.int64)) * BLOCK, BLOCK
        acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, K_bh + base * stride_kl, V_bh + base * stride_vl,
                                      cont_k, cont_v, Bias_bh + (n_tiles + t) * BLOCK, BLOCK_N, offs_n, offs_n * 0,
                                      BLOCK_N, t_rows, 1,
                                      stride_kl, stride_vl, offs_n, d_ok, qk_scale,
                                      BLOCK, BLOCK_N, EVEN_D, DOT_PRECISION, True, IN_PLACE and TEXT_PAD)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = (acc / l_safe[:, None]).to(Out.dtype.element_ty)
    o_ptrs = Out + b * stride_ob + h * stride_oh + q_rows[:, None] * stride_ol + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out, mask=q_ok[:, None] & d_ok[None, :])


@dataclass(frozen=True)
class AttentionTuning:
    """Launch parameters of the Triton attention kernel; ``launch_config`` picks them (the sweep overrides)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def launch_config(dtype: torch.dtype, block: int, head_dim: int, in_place: bool = False) -> AttentionTuning:
    """Tile sizes and warps of the kernel (benchmarks/sweep_attention.py; docs/design.md, "Triton attention kernel").

    16-bit: a whole 128-token tile per step, 8 warps, 3 stages (2 when tiles are
    addressed in place: more registers go to addresses). float32 (4-byte
    operands) halves the tiles to stay within registers and shared memory.
    """
    fp32 = dtype == torch.float32
    block_m, block_n, stages = (64, 32, 2) if fp32 else (128, 128, 2 if in_place else 3)
    block_m, block_n = min(block_m, block), min(block_n, block)
    warps = 8 if block_m * max(64, head_dim) >= 128 * 128 else 4
    return AttentionTuning(block_m, block_n, warps, stages)


def _launch(q, k, v, out, kv_idx, kv_cnt, key_bias, scale, geom: Geometry | None, n_tiles, n_text_blocks, block,
            visual_bias, tuning: AttentionTuning | None):
    """One launch; ``geom`` None: tile-major inputs (only the block counts matter), else in place."""
    B, n_heads, _, D = q.shape
    in_place = geom is not None
    n_blocks = n_tiles + n_text_blocks
    bias = key_bias.expand(B, n_heads, n_blocks * block)
    cfg = tuning or launch_config(q.dtype, block, D, in_place)
    if in_place:
        (_, H, W), (th, tw), (nh, nw) = geom.grid, geom.tile, geom.tiles_hw
        vis_off, text = geom.visual_offset, (geom.prefix_len, geom.n_prefix_blocks, geom.suffix_offset, geom.suffix_len)
        visual_pad, text_pad = geom.has_visual_padding, geom.has_text_padding
    else:  # a stand-in grid with the same blocks: one tile of ``block`` tokens a frame
        H, W, th, tw, nh, nw = 1, block, 1, block, 1, 1
        vis_off, text = 0, (0, 0, 0, 0)
        visual_pad = text_pad = False
    block_n = max(cfg.block_n, tw) if in_place else cfg.block_n  # sub-tiles of whole tile rows
    block_d = max(16, next_pow2(D))
    launcher(_block_sparse_attn_kernel)[(n_blocks * (block // cfg.block_m), B * n_heads)](
        q, k, v, out, bias, kv_idx, kv_cnt,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        bias.stride(0), bias.stride(1),
        kv_idx.stride(0), kv_idx.stride(1), kv_idx.stride(2),
        kv_cnt.stride(0), kv_cnt.stride(1),
        n_heads, n_tiles, n_text_blocks, D, scale * LOG2E,
        H, W, th, tw, nw, nh * nw, vis_off, *text,
        BLOCK=block, BLOCK_M=cfg.block_m, BLOCK_N=block_n, BLOCK_D=block_d, EVEN_D=D == block_d,
        # float32 models: 3xTF32 dots keep float32 accuracy on tensor cores (plain "ieee" dots
        # compiled for minutes per shape and ran off tensor cores: docs/design.md).
        DOT_PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32", VISUAL_BIAS=bool(visual_bias),
        IN_PLACE=in_place, VISUAL_PAD=visual_pad, TEXT_PAD=text_pad,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def block_sparse_attention_triton(q, k, v, kv_idx, kv_cnt, key_bias, scale, block, n_text_blocks, visual_bias=True,
                                  tuning: AttentionTuning | None = None):
    """Tile-major q, k, v [B, heads, Lp, D] -> tile-major output, with the Triton kernel."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    return _launch(q, k, v, out, kv_idx, kv_cnt, key_bias, scale, None, kv_idx.shape[2], n_text_blocks, block,
                   visual_bias, tuning)


def tiled_attention_triton(q, k, v, kv_idx, kv_cnt, key_bias, scale, geom: Geometry, visual_bias=True,
                           tuning: AttentionTuning | None = None):
    """Original-order q, k, v [B, heads, L, D] (any strides) -> output in the original order, q's strides."""
    return _launch(q, k, v, torch.empty_like(q), kv_idx, kv_cnt, key_bias, scale, geom, geom.n_tiles,
                   geom.n_text_blocks, geom.block, visual_bias, tuning)
