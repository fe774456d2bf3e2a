"""Stage 4, sparse-attn: block-sparse flash attention (and stages 3-5 fused).

``draftopt::block_sparse_attention(q, k, v, kv_idx, kv_cnt, key_bias, scale,
block, n_text_blocks)`` takes q, k, v in the padded tile-major layout
[B, heads, Lp, D] (``permute_tiles``), where the first S blocks are visual
tiles and the last ``n_text_blocks`` are text:

- a visual query tile attends to its selected key tiles (``kv_idx[..., :kv_cnt]``)
  and to every text block;
- a text query block attends to every block;
- ``key_bias`` [B or 1, heads or 1, Lp] float32 is added to every score of a
  key: 0 for real keys, -inf for padding rows and for keys hidden by a key
  padding mask (``draft_attention`` builds it).

``draftopt::tiled_attention(q, k, v, kv_idx, kv_cnt, key_bias, scale, <geometry>,
visual_bias)`` computes the same on q, k, v in the original token order: the
kernel reads each tile where it lies (one scalar base per tile, thanks to the
box order of the tile-major layout, see geometry.py) and writes the output
rows back in place, so no permuted copies exist. ``fuse_pays`` says for which
geometries that is the faster choice.

On Hopper (sm_90, 16-bit, D 64 or 128, 128-token blocks) both ops run the
Gluon kernel of attention_sm90.py (warp-specialized, TMA, wgmma: ~97% of
cuDNN's dense throughput against ~62% for the Triton kernel below); an explicit
``config`` forces the Triton kernel (the sweeps use it).

Triton kernel: one program computes one query block with an online softmax in float32
(FlashAttention-2 style, exp2, ``tl.dot`` on [BLOCK, D] tiles). A row whose
keys are all masked returns zeros rather than NaN. ``visual_bias=False`` lets
the kernel skip the bias add on visual key tiles (nothing can mask them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from . import attention_sm90
from ._common import LOG2E, alloc, alloc_like, check_dtype, launcher, make_inference_only, next_pow2, refuse_grad, use_triton
from .block_mask import indices_to_dense
from .geometry import Geometry, original_to_permuted_index, permuted_source_index
from .permute import gather_rows_reference, gather_rows_triton


@triton.jit
def _tile_origin(kb, nw, nhw, th, tw, Hg, Wg, vis_off):
    """Visual tile ``kb`` in the original order: (token row of its first row, rows and columns left in the frame)."""
    t = kb // nhw
    i = (kb % nhw) // nw
    j = kb % nw
    base = vis_off + t.to(tl.int64) * Hg * Wg + (i * th).to(tl.int64) * Wg + j * tw
    return base, Hg - i * th, Wg - j * tw


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
    Hg, Wg, th, tw, nw, nhw, vis_off, text_off, text_len,
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, VISUAL_BIAS: tl.constexpr,
    IN_PLACE: tl.constexpr, VISUAL_PAD: tl.constexpr, TEXT_PAD: tl.constexpr,
):
    # One program: BLOCK_M query rows of one query block (BLOCK rows = one tile).
    # IN_PLACE: q, k, v, out in the original token order ([B, heads, L, D], any
    # strides), each tile read where it lies (tile-major layout: see geometry.py);
    # else tile-major copies. VISUAL_PAD / TEXT_PAD: such blocks hold padding rows.
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
        box_k = (pa * Wg + pb)[:, None] * stride_kl + offs_d[None, :] * stride_kd
        box_v = (pa * Wg + pb)[:, None] * stride_vl + offs_d[None, :] * stride_vd
        a_step = BLOCK_N // tw
        box_step = a_step * Wg
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
        vbase, lim_a, lim_b = _tile_origin(tl.minimum(pid_m, n_tiles - 1), nw, nhw, th, tw, Hg, Wg, vis_off)
        q_rows = tl.where(is_text, text_off + tb.to(tl.int64) * BLOCK + r, vbase + (r // tw) * Wg + r % tw)
        q_ok = tl.where(is_text, tb * BLOCK + r < text_len, (r // tw < lim_a) & (r % tw < lim_b))
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
            base, ka, kc = _tile_origin(kb, nw, nhw, th, tw, Hg, Wg, vis_off)
        else:
            base, ka, kc = kb.to(tl.int64) * BLOCK, BLOCK, 1
        acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, K_bh + base * stride_kl, V_bh + base * stride_vl,
                                      box_k, box_v, Bias_bh + kb * BLOCK, box_step, pa, pb, a_step, ka, kc,
                                      stride_kl, stride_vl, offs_n, d_ok, qk_scale,
                                      BLOCK, BLOCK_N, EVEN_D, DOT_PRECISION, VISUAL_BIAS, IN_PLACE and VISUAL_PAD)
    # Text key blocks: every query attends to them; their bias (padding, key mask) always applies.
    for t in range(0, n_text_blocks):
        if IN_PLACE:
            base = text_off + tl.cast(t, tl.int64) * BLOCK
        else:
            base = (n_tiles + tl.cast(t, tl.int64)) * BLOCK
        acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, K_bh + base * stride_kl, V_bh + base * stride_vl,
                                      cont_k, cont_v, Bias_bh + (n_tiles + t) * BLOCK, BLOCK_N, offs_n, offs_n * 0,
                                      BLOCK_N, text_len - t * BLOCK, 1,
                                      stride_kl, stride_vl, offs_n, d_ok, qk_scale,
                                      BLOCK, BLOCK_N, EVEN_D, DOT_PRECISION, True, IN_PLACE and TEXT_PAD)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = (acc / l_safe[:, None]).to(Out.dtype.element_ty)
    o_ptrs = Out + b * stride_ob + h * stride_oh + q_rows[:, None] * stride_ol + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out, mask=q_ok[:, None] & d_ok[None, :])


def launch_config(dtype: torch.dtype, block: int, head_dim: int, in_place: bool = False) -> dict:
    """Tile sizes and warps for the attention kernel (see benchmarks/NOTES.md for the sweeps)."""
    fp32 = dtype == torch.float32
    # 16-bit: a whole 128-token tile per step, 8 warps, 3 stages was the fastest of
    # ten configs on an H100 (HunyuanVideo 720p at 0.9: 57.4 ms vs 62.6 ms for
    # 128 x 64 x 2 stages; Wan 480p 3.00 vs 3.37 ms). Tiles addressed in place
    # (more registers for addresses) ran best with 2 stages: 53.7 vs 55.4 ms.
    # float32 (4-byte operands) halves the tiles to stay within registers and shared memory.
    block_m, block_n, stages = (64, 32, 2) if fp32 else (128, 128, 2 if in_place else 3)
    block_m, block_n = min(block_m, block), min(block_n, block)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=8 if block_m * max(64, head_dim) >= 128 * 128 else 4,
                num_stages=stages)


def _launch(q, k, v, out, kv_idx, kv_cnt, key_bias, scale, geom, visual_bias, in_place, config):
    B, H, _, D = q.shape
    bias = key_bias.expand(B, H, geom.padded_len)
    cfg = dict(launch_config(q.dtype, geom.block, D, in_place), **(config or {}))
    (_, Hg, Wg), (th, tw), (_, nw) = geom.grid, geom.tile, geom.tiles_hw
    if in_place:  # sub-tiles of whole tile rows: each starts a fixed number of rows later
        cfg["BLOCK_N"] = max(cfg["BLOCK_N"], tw)
    block_d = max(16, next_pow2(D))
    launcher(_block_sparse_attn_kernel)[(geom.n_blocks * (geom.block // cfg["BLOCK_M"]), B * H)](
        q, k, v, out, bias, kv_idx, kv_cnt,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        bias.stride(0), bias.stride(1),
        kv_idx.stride(0), kv_idx.stride(1), kv_idx.stride(2),
        kv_cnt.stride(0), kv_cnt.stride(1),
        H, geom.n_tiles, geom.n_text_blocks, D, scale * LOG2E,
        Hg, Wg, th, tw, nw, geom.tiles_hw[0] * nw, geom.visual_offset, geom.text_offset, geom.text_len,
        BLOCK=geom.block, BLOCK_D=block_d, EVEN_D=D == block_d,
        # float32 models: 3xTF32 dots keep float32 accuracy on tensor cores (plain
        # "ieee" dots compiled for 35 s per shape on the H100 and ran off tensor cores).
        DOT_PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32", VISUAL_BIAS=bool(visual_bias),
        IN_PLACE=in_place, VISUAL_PAD=geom.has_visual_padding, TEXT_PAD=geom.text_len % geom.block != 0,
        **cfg,
    )
    return out


def block_sparse_attention_triton(q, k, v, kv_idx, kv_cnt, key_bias, scale, block, n_text_blocks, config=None,
                                  visual_bias=True):
    """Tile-major q, k, v [B, H, Lp, D] -> tile-major output (the Gluon kernel on Hopper, unless ``config``)."""
    if config is None and attention_sm90.supported(q, block):
        return torch.ops.draftopt.attend_sm90(q, k, v, kv_idx, kv_cnt, key_bias, scale, kv_idx.shape[2],
                                              n_text_blocks, visual_bias)
    B, H, Lp, D = q.shape
    # Tile-major input: only the block counts matter; a stand-in geometry with the same blocks.
    geom = _BlockCounts(kv_idx.shape[2], n_text_blocks, block)
    out = alloc((B, H, Lp, D), q.dtype, q.device)
    return _launch(q, k, v, out, kv_idx, kv_cnt, key_bias, scale, geom, visual_bias, False, config)


class _BlockCounts:
    """The Geometry attributes ``_launch`` reads, for tile-major inputs (no grid needed)."""

    def __init__(self, n_tiles, n_text_blocks, block):
        self.n_tiles, self.n_text_blocks, self.block = n_tiles, n_text_blocks, block
        self.n_blocks, self.padded_len = n_tiles + n_text_blocks, (n_tiles + n_text_blocks) * block
        self.grid, self.tile, self.tiles_hw = (1, 1, block), (1, block), (1, 1)
        self.visual_offset = self.text_offset = self.text_len = 0
        self.has_visual_padding = False


def block_sparse_attention_reference(q, k, v, kv_idx, kv_cnt, key_bias, scale, block, n_text_blocks):
    """Dense attention with the block mask expanded to tokens (float32, float64 for float64 input)."""
    B, H, Lp, _ = q.shape
    S = kv_idx.shape[2]
    nb = S + n_text_blocks
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    blocks = torch.ones(B, H, nb, nb, dtype=torch.bool, device=q.device)
    blocks[..., :S, :S] = indices_to_dense(kv_idx, kv_cnt)
    allowed = blocks.repeat_interleave(block, dim=2).repeat_interleave(block, dim=3)
    scores = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * scale + key_bias.to(acc)[..., None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows -> zeros, as the kernel
    return (p @ v.to(acc)).to(q.dtype)


@triton_op("draftopt::block_sparse_attention", mutates_args=())
def _block_sparse_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_idx: torch.Tensor, kv_cnt: torch.Tensor,
    key_bias: torch.Tensor, scale: float, block: int, n_text_blocks: int, visual_bias: bool = True,
) -> torch.Tensor:
    if use_triton(q):
        return block_sparse_attention_triton(q, k, v, kv_idx, kv_cnt, key_bias, scale, block, n_text_blocks,
                                             visual_bias=visual_bias)
    return block_sparse_attention_reference(q, k, v, kv_idx, kv_cnt, key_bias, scale, block, n_text_blocks)


make_inference_only(_block_sparse_attention_op, "block_sparse_attention")


def block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_idx: torch.Tensor, kv_cnt: torch.Tensor,
    geom, *, key_bias: torch.Tensor | None = None, scale: float | None = None, visual_bias: bool | None = None,
) -> torch.Tensor:
    """Block-sparse attention on tile-major q, k, v [B, heads, Lp, D] (see the module doc).

    ``key_bias`` defaults to 0 for real tokens and -inf for padding rows.
    ``visual_bias``: whether ``key_bias`` may be nonzero on visual key tiles. The
    kernel skips the bias add on those tiles when it is False (text blocks always
    get it). Default: True when ``key_bias`` is given, else whether the geometry
    has padding rows in edge tiles.
    """

    if q.dim() == 4 and q.shape[2] != geom.padded_len:
        raise ValueError(f"q has {q.shape[2]} rows; the tile-major layout of {geom} has {geom.padded_len}")
    key_bias, scale, visual_bias = _checked_args("block_sparse_attention", q, k, v, kv_idx, kv_cnt, geom,
                                                 key_bias, scale, visual_bias)
    return torch.ops.draftopt.block_sparse_attention(
        q, k, v, kv_idx, kv_cnt, key_bias, scale, geom.block, geom.n_text_blocks, visual_bias)


def _checked_args(name, q, k, v, kv_idx, kv_cnt, geom, key_bias, scale, visual_bias):
    """Shared checks and defaults of the two attention wrappers: (key_bias, scale, visual_bias)."""
    if not (q.dim() == 4 and q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must share one shape [B, heads, L, D]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, _, D = q.shape
    if tuple(kv_idx.shape[:3]) != (B, H, geom.n_tiles) or tuple(kv_cnt.shape) != (B, H, geom.n_tiles):
        raise ValueError(f"kv_idx {tuple(kv_idx.shape)} / kv_cnt {tuple(kv_cnt.shape)} do not match "
                         f"[B={B}, heads={H}, S={geom.n_tiles}, K] / [B, heads, S]")
    if use_triton(q):
        check_dtype("q", q)
    refuse_grad(name, q, k, v)
    if visual_bias is None:
        visual_bias = needs_visual_bias(key_bias is not None, geom)
    if key_bias is None:
        key_bias = permuted_key_bias(None, B, H, geom, q.device)
    return key_bias, D ** -0.5 if scale is None else float(scale), bool(visual_bias)


# -- stages 3-5 fused: tiles addressed in place ------------------------------------------
def tiled_attention_triton(q, k, v, kv_idx, kv_cnt, key_bias, scale, geom, visual_bias=True, config=None):
    """Original-order q, k, v [B, H, L, D] -> output in the original order, with q's strides.

    On Hopper the Gluon kernel runs instead (BENCHMARKS.md: HunyuanVideo 720p at 0.9,
    38 ms with permuted copies vs 54 ms for this Triton kernel in place): addressing
    tiles in place through TMA boxes at batch 1, else on permuted copies.
    """
    if config is None and attention_sm90.in_place_supported(q, k, v, geom):
        return torch.ops.draftopt.attend_sm90_in_place(q, k, v, kv_idx, kv_cnt, key_bias, scale, *geom.op_args(),
                                                       visual_bias)
    if config is None and attention_sm90.supported(q, geom.block):
        src = permuted_source_index(geom, q.device)
        qp, kp, vp = (gather_rows_triton(t, src) for t in (q, k, v))
        out_p = torch.ops.draftopt.attend_sm90(qp, kp, vp, kv_idx, kv_cnt, key_bias, scale, geom.n_tiles,
                                               geom.n_text_blocks, visual_bias)
        return gather_rows_triton(out_p, original_to_permuted_index(geom, q.device), out=alloc_like(q))
    return _launch(q, k, v, alloc_like(q), kv_idx, kv_cnt, key_bias, scale, geom, visual_bias, True, config)


def tiled_attention_reference(q, k, v, kv_idx, kv_cnt, key_bias, scale, geom):
    """The unfused stages: permute, block-sparse attention, unpermute."""
    qp, kp, vp = (gather_rows_reference(t, permuted_source_index(geom, t.device)) for t in (q, k, v))
    out_p = block_sparse_attention_reference(qp, kp, vp, kv_idx, kv_cnt, key_bias, scale, geom.block,
                                             geom.n_text_blocks)
    out = alloc_like(q)
    out.copy_(gather_rows_reference(out_p, original_to_permuted_index(geom, q.device)))
    return out


def needs_visual_bias(has_mask: bool, geom) -> bool:
    """Whether the key bias can be nonzero on visual key tiles: a user mask, or padding rows in edge tiles."""
    return has_mask or geom.has_visual_padding


def fuse_pays(geom, q: torch.Tensor | None = None) -> bool:
    """Whether stages 3-5 as one ``tiled_attention`` op beat separate permute, attend, unpermute.

    Measured on an H100 (bf16, sparsity 0.9, BENCHMARKS.md). With the Gluon kernel
    (sm_90, ``q`` given) always: it reads tiles in place at batch 1, edge tiles
    clipped by the TMA unit at no cost (HunyuanVideo 720p: 37.6 ms vs 36.5 + 2.4
    for the copies), and permutes inside the op otherwise. With the Triton kernel
    only where no tile holds padding rows: its masked loads cost more than the
    copies there (Wan2.1-14B 720p: 37.4 ms vs 33.1 + 2.4), not elsewhere
    (HunyuanVideo 720p: 54.1 ms vs 55.3 + 2.4).
    """
    if q is not None and attention_sm90.supported(q, geom.block):
        return True
    return not geom.has_visual_padding


@triton_op("draftopt::tiled_attention", mutates_args=())
def _tiled_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_idx: torch.Tensor, kv_cnt: torch.Tensor,
    key_bias: torch.Tensor, scale: float, T: int, H: int, W: int, th: int, tw: int, text_len: int,
    text_first: bool, visual_bias: bool,
) -> torch.Tensor:
    geom = Geometry.from_op_args(T, H, W, th, tw, text_len, text_first)
    if use_triton(q):
        return tiled_attention_triton(q, k, v, kv_idx, kv_cnt, key_bias, scale, geom, visual_bias)
    return tiled_attention_reference(q, k, v, kv_idx, kv_cnt, key_bias, scale, geom)


make_inference_only(_tiled_attention_op, "tiled_attention")


def tiled_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_idx: torch.Tensor, kv_cnt: torch.Tensor,
    geom, *, key_bias: torch.Tensor | None = None, scale: float | None = None, visual_bias: bool | None = None,
) -> torch.Tensor:
    """Stages 3-5 in one kernel: block-sparse attention on q, k, v in the original token order.

    Same result as ``unpermute_tiles(block_sparse_attention(permute_tiles(q), ...))``
    without the permuted copies: the kernel reads each tile's rows where they
    are (any strides, e.g. SDPA's transposed [B, L, heads, D] views) and writes
    the output rows to their original places. ``key_bias`` is in the tile-major
    layout (``permuted_key_bias``); ``visual_bias`` as for ``block_sparse_attention``.

    Example:
        >>> from draftopt.kernels import Geometry, draft_map, select_blocks, tile_pool, tiled_attention
        >>> g = Geometry((2, 16, 16), (8, 16))
        >>> q, k, v = (torch.randn(1, 2, g.seq_len, 64) for _ in range(3))
        >>> kv_idx, kv_cnt = select_blocks(draft_map(tile_pool(q, g), tile_pool(k, g), 0.125), 0.5)
        >>> tiled_attention(q, k, v, kv_idx, kv_cnt, g).shape
        torch.Size([1, 2, 512, 64])
    """
    if q.dim() == 4:
        geom.check_seq_len(q.shape[2], "q")
    key_bias, scale, visual_bias = _checked_args("tiled_attention", q, k, v, kv_idx, kv_cnt, geom,
                                                 key_bias, scale, visual_bias)
    return torch.ops.draftopt.tiled_attention(q, k, v, kv_idx, kv_cnt, key_bias, scale, *geom.op_args(),
                                              visual_bias)


# -- key bias: an SDPA key padding mask in the tile-major layout -------------------------
def check_key_padding_mask(shape: tuple, B: int, H: int, L: int) -> None:
    """Raise ValueError unless an SDPA mask of ``shape`` only hides keys (query dim 1)."""
    full = (1,) * (4 - len(shape)) + tuple(shape)
    if len(shape) > 4 or full[2] != 1 or full[3] != L or full[0] not in (1, B) or full[1] not in (1, H):
        raise ValueError(
            f"attn_mask of shape {tuple(shape)} is not a key padding mask for "
            f"[B={B}, heads={H}, L={L}]: its query dimension must be 1 (e.g. [B, 1, 1, L]); "
            "draftopt cannot sparsify attention with a per-query mask"
        )


def key_padding_bias(attn_mask: torch.Tensor | None, B: int, H: int, L: int, device) -> torch.Tensor:
    """An SDPA ``attn_mask`` that only hides keys -> additive float32 bias [B or 1, H or 1, L].

    The mask follows SDPA's broadcasting (right-aligned to [B, heads, Lq, Lk]);
    its query dimension must be 1 (a key padding mask, as HunyuanVideo passes
    for its text). Boolean True means "attend".
    """
    if attn_mask is None:
        return torch.zeros(1, 1, L, device=device, dtype=torch.float32)
    check_key_padding_mask(tuple(attn_mask.shape), B, H, L)
    m = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    m = m[:, :, 0, :]
    if m.dtype == torch.bool:
        return torch.zeros(m.shape, device=device, dtype=torch.float32).masked_fill(~m, float("-inf"))
    return m.to(torch.float32)


@triton_op("draftopt::key_bias", mutates_args=())
def _key_bias_op(
    mask: torch.Tensor | None, B: int, H: int, T: int, Hg: int, Wg: int, th: int, tw: int, text_len: int,
    text_first: bool, device: torch.device,
) -> torch.Tensor:
    """[B|1, H|1, Lp] float32: the mask as an additive bias, -inf on padding rows."""
    geom = Geometry.from_op_args(T, Hg, Wg, th, tw, text_len, text_first)
    bias = key_padding_bias(mask, B, H, geom.seq_len, device)
    src = permuted_source_index(geom, device)
    return torch.where(src >= 0, bias.index_select(-1, src.clamp(min=0)), float("-inf"))


make_inference_only(_key_bias_op, "key_bias")


def permuted_key_bias(attn_mask, B: int, H: int, geom, device) -> torch.Tensor:
    """An SDPA key padding mask (or None) laid out as ``block_sparse_attention``'s key bias."""
    return torch.ops.draftopt.key_bias(attn_mask, B, H, *geom.op_args(), torch.device(device))
