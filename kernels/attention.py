"""Stage 4, sparse-attn: block-sparse flash attention over tile-major q, k, v.

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

One program computes one query block with an online softmax in float32
(FlashAttention-2 style, exp2, ``tl.dot`` on [BLOCK, D] tiles). A row whose
keys are all masked returns zeros rather than NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ._common import LOG2E, alloc, alloc_like, check_dtype, launcher, make_inference_only, next_pow2, refuse_grad, use_triton
from .block_mask import indices_to_dense
from .geometry import Geometry, original_to_permuted_index, permuted_source_index
from .permute import gather_rows_reference


@triton.jit
def _token_rows(Src, prow0, offs, GATHER: tl.constexpr):
    """Rows ``prow0 + offs`` of the tile-major layout -> rows of q/k/v in memory (int64; -1: padding).

    Tile-major inputs (GATHER False) hold them in order; original-order inputs
    are addressed in place through ``Src`` (``permuted_source_index``).
    """
    if GATHER:
        return tl.load(Src + prow0 + offs).to(tl.int64)
    else:
        return (prow0 + offs).to(tl.int64)


@triton.jit
def _load_rows(Base, rows, stride_l, stride_d, offs_d, d_ok, ROW_MASK: tl.constexpr, EVEN_D: tl.constexpr):
    """[len(rows), BLOCK_D] rows of a [L, D] matrix; padding rows (-1) read as zeros when ROW_MASK."""
    ptrs = Base + rows[:, None] * stride_l + offs_d[None, :] * stride_d
    if ROW_MASK:
        return tl.load(ptrs, mask=(rows >= 0)[:, None] & d_ok[None, :], other=0.0)
    elif EVEN_D:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=d_ok[None, :], other=0.0)


@triton.jit
def _attend_block(
    acc, l_i, m_i, q, K_bh, V_bh, Bias_bh, Src, kb, offs_n, offs_d, d_ok,
    stride_kl, stride_kd, stride_vl, stride_vd, qk_scale,
    BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    APPLY_BIAS: tl.constexpr, GATHER: tl.constexpr, ROW_MASK: tl.constexpr,
):
    """Fold key block ``kb`` (BLOCK keys, BLOCK_N at a time) into the running softmax.

    Without a bias the scale is folded into one multiply-add per score (as
    FlashAttention does); with one, a row whose keys are all masked so far
    keeps m = -inf and contributes nothing.
    """
    for n0 in tl.static_range(0, BLOCK, BLOCK_N):
        prow0 = kb.to(tl.int64) * BLOCK + n0
        rows = _token_rows(Src, prow0, offs_n, GATHER)
        k = _load_rows(K_bh, rows, stride_kl, stride_kd, offs_d, d_ok, ROW_MASK, EVEN_D)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if APPLY_BIAS:
            # qk_scale and the bias are both in log2 units: exp2 below.
            bias = tl.load(Bias_bh + prow0 + offs_n)
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
        v = _load_rows(V_bh, rows, stride_vl, stride_vd, offs_d, d_ok, ROW_MASK, EVEN_D)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _block_sparse_attn_kernel(
    Q, K, V, Out, Bias, KvIdx, KvCnt, Src,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_bb, stride_bh,
    stride_ib, stride_ih, stride_is,
    stride_cb, stride_ch,
    n_heads, n_tiles, n_text_blocks, head_dim, qk_scale,
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, VISUAL_BIAS: tl.constexpr,
    GATHER: tl.constexpr, VISUAL_PAD: tl.constexpr, TEXT_PAD: tl.constexpr,
):
    # One program: BLOCK_M query rows of one query block (BLOCK rows = one tile).
    # GATHER: q, k, v, out in the original token order, tiles addressed in place
    # through Src; VISUAL_PAD / TEXT_PAD: whether such blocks hold padding rows.
    pid = tl.program_id(0)
    pid_m = pid // (BLOCK // BLOCK_M)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim

    q_rows = _token_rows(Src, pid.to(tl.int64) * BLOCK_M, tl.arange(0, BLOCK_M), GATHER)
    q = _load_rows(Q + b * stride_qb + h * stride_qh, q_rows, stride_ql, stride_qd, offs_d, d_ok, GATHER, EVEN_D)
    K_bh = K + b * stride_kb + h * stride_kh
    qk_scale = tl.cast(qk_scale, tl.float32)  # Inductor passes Python floats as fp64
    V_bh = V + b * stride_vb + h * stride_vh
    Bias_bh = Bias + b * stride_bb + h * stride_bh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Visual key tiles: the selected list for a visual query tile, all tiles for text.
    is_text = pid_m >= n_tiles
    row = tl.minimum(pid_m, n_tiles - 1)
    cnt = tl.load(KvCnt + b * stride_cb + h * stride_ch + row)
    n_keys = tl.where(is_text, n_tiles, cnt)
    idx_row = KvIdx + b * stride_ib + h * stride_ih + row * stride_is
    for j in range(0, n_keys):
        kb = tl.load(idx_row + j, mask=j < cnt, other=0)
        kb = tl.where(is_text, j, kb)
        acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, K_bh, V_bh, Bias_bh, Src, kb, offs_n, offs_d, d_ok,
                                      stride_kl, stride_kd, stride_vl, stride_vd, qk_scale,
                                      BLOCK, BLOCK_N, EVEN_D, DOT_PRECISION, VISUAL_BIAS, GATHER,
                                      GATHER and VISUAL_PAD)
    # Text key blocks: every query attends to them; their bias (padding, key mask) always applies.
    for t in range(0, n_text_blocks):
        acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, K_bh, V_bh, Bias_bh, Src, n_tiles + t, offs_n, offs_d, d_ok,
                                      stride_kl, stride_kd, stride_vl, stride_vd, qk_scale,
                                      BLOCK, BLOCK_N, EVEN_D, DOT_PRECISION, True, GATHER, GATHER and TEXT_PAD)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = (acc / l_safe[:, None]).to(Out.dtype.element_ty)
    o_ptrs = Out + b * stride_ob + h * stride_oh + q_rows[:, None] * stride_ol + offs_d[None, :] * stride_od
    if GATHER:  # padding rows have no place in the original order
        tl.store(o_ptrs, out, mask=(q_rows >= 0)[:, None] & d_ok[None, :])
    else:
        tl.store(o_ptrs, out, mask=d_ok[None, :])


def launch_config(dtype: torch.dtype, block: int, head_dim: int) -> dict:
    """Tile sizes and warps for the attention kernel (see benchmarks/NOTES.md for the sweep)."""
    fp32 = dtype == torch.float32
    # 16-bit: a whole 128-token tile per step, 8 warps, 3 stages was the fastest of
    # ten configs on an H100 (HunyuanVideo 720p at 0.9: 57.4 ms vs 62.6 ms for
    # 128 x 64 x 2 stages; Wan 480p 3.00 vs 3.37 ms). float32 (4-byte operands)
    # halves the tiles to stay within registers and shared memory.
    block_m, block_n, stages = (64, 32, 2) if fp32 else (128, 128, 3)
    block_m, block_n = min(block_m, block), min(block_n, block)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=8 if block_m * max(64, head_dim) >= 128 * 128 else 4,
                num_stages=stages)


def _launch(q, k, v, out, kv_idx, kv_cnt, key_bias, scale, geom, visual_bias, src, config):
    B, H, _, D = q.shape
    bias = key_bias.expand(B, H, geom.padded_len)
    cfg = dict(launch_config(q.dtype, geom.block, D), **(config or {}))
    block_d = max(16, next_pow2(D))
    launcher(_block_sparse_attn_kernel)[(geom.n_blocks * (geom.block // cfg["BLOCK_M"]), B * H)](
        q, k, v, out, bias, kv_idx, kv_cnt, src if src is not None else kv_cnt,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        bias.stride(0), bias.stride(1),
        kv_idx.stride(0), kv_idx.stride(1), kv_idx.stride(2),
        kv_cnt.stride(0), kv_cnt.stride(1),
        H, geom.n_tiles, geom.n_text_blocks, D, scale * LOG2E,
        BLOCK=geom.block, BLOCK_D=block_d, EVEN_D=D == block_d,
        # float32 models: 3xTF32 dots keep float32 accuracy on tensor cores (plain
        # "ieee" dots compiled for 35 s per shape on the H100 and ran off tensor cores).
        DOT_PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32", VISUAL_BIAS=bool(visual_bias),
        GATHER=src is not None, VISUAL_PAD=geom.has_visual_padding, TEXT_PAD=geom.text_len % geom.block != 0,
        **cfg,
    )
    return out


def block_sparse_attention_triton(q, k, v, kv_idx, kv_cnt, key_bias, scale, block, n_text_blocks, config=None,
                                  visual_bias=True):
    """Tile-major q, k, v [B, H, Lp, D] -> tile-major output."""
    B, H, Lp, D = q.shape
    # Only the block counts matter for tile-major input: a stand-in geometry with the same blocks.
    geom = Geometry((1, kv_idx.shape[2], block), (1, block), n_text_blocks * block)
    out = alloc((B, H, Lp, D), q.dtype, q.device)
    return _launch(q, k, v, out, kv_idx, kv_cnt, key_bias, scale, geom, visual_bias, None, config)


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

    if not (q.dim() == 4 and q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must share one shape [B, heads, Lp, D]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, Lp, D = q.shape
    if Lp != geom.padded_len:
        raise ValueError(f"q has {Lp} rows; the tile-major layout of {geom} has {geom.padded_len}")
    if tuple(kv_idx.shape[:3]) != (B, H, geom.n_tiles) or tuple(kv_cnt.shape) != (B, H, geom.n_tiles):
        raise ValueError(f"kv_idx {tuple(kv_idx.shape)} / kv_cnt {tuple(kv_cnt.shape)} do not match "
                         f"[B={B}, heads={H}, S={geom.n_tiles}, K] / [B, heads, S]")
    if use_triton(q):
        check_dtype("q", q)
    refuse_grad("block_sparse_attention", q, k, v)
    if visual_bias is None:
        visual_bias = key_bias is not None or geom.has_visual_padding
    if key_bias is None:
        key_bias = permuted_key_bias(None, B, H, geom, q.device)
    scale = D ** -0.5 if scale is None else float(scale)
    return torch.ops.draftopt.block_sparse_attention(
        q, k, v, kv_idx, kv_cnt, key_bias, scale, geom.block, geom.n_text_blocks, bool(visual_bias))


# -- stages 3-5 fused: tiles addressed in place ------------------------------------------
def tiled_attention_triton(q, k, v, kv_idx, kv_cnt, key_bias, scale, geom, visual_bias=True, config=None):
    """Original-order q, k, v [B, H, L, D] -> output in the original order, with q's strides."""
    src = permuted_source_index(geom, q.device).to(torch.int32)
    return _launch(q, k, v, alloc_like(q), kv_idx, kv_cnt, key_bias, scale, geom, visual_bias, src, config)


def tiled_attention_reference(q, k, v, kv_idx, kv_cnt, key_bias, scale, geom):
    """The unfused stages: permute, block-sparse attention, unpermute."""
    qp, kp, vp = (gather_rows_reference(t, permuted_source_index(geom, t.device)) for t in (q, k, v))
    out_p = block_sparse_attention_reference(qp, kp, vp, kv_idx, kv_cnt, key_bias, scale, geom.block,
                                             geom.n_text_blocks)
    out = alloc_like(q)
    out.copy_(gather_rows_reference(out_p, original_to_permuted_index(geom, q.device)))
    return out


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
        >>> g = Geometry((2, 16, 16), (8, 16))
        >>> q, k, v = (torch.randn(1, 2, g.seq_len, 64) for _ in range(3))
        >>> kv_idx, kv_cnt = select_blocks(draft_map(tile_pool(q, g), tile_pool(k, g), 0.125), 0.5)
        >>> tiled_attention(q, k, v, kv_idx, kv_cnt, g).shape
        torch.Size([1, 2, 512, 64])
    """
    if not (q.dim() == 4 and q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must share one shape [B, heads, L, D]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, L, D = q.shape
    geom.check_seq_len(L, "q")
    if tuple(kv_idx.shape[:3]) != (B, H, geom.n_tiles) or tuple(kv_cnt.shape) != (B, H, geom.n_tiles):
        raise ValueError(f"kv_idx {tuple(kv_idx.shape)} / kv_cnt {tuple(kv_cnt.shape)} do not match "
                         f"[B={B}, heads={H}, S={geom.n_tiles}, K] / [B, heads, S]")
    if use_triton(q):
        check_dtype("q", q)
    refuse_grad("tiled_attention", q, k, v)
    if visual_bias is None:
        visual_bias = key_bias is not None or geom.has_visual_padding
    if key_bias is None:
        key_bias = permuted_key_bias(None, B, H, geom, q.device)
    scale = D ** -0.5 if scale is None else float(scale)
    return torch.ops.draftopt.tiled_attention(q, k, v, kv_idx, kv_cnt, key_bias, scale, *geom.op_args(),
                                              bool(visual_bias))


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
