"""Stage 2, mask: the draft attention map and the block selection policies.

``draftopt::draft_map(q_pool, k_pool, scale) -> P`` [B, heads, S, S] float32:
``softmax(q_pool @ k_pool^T * scale)`` per row, one fused Triton kernel
(two passes over the key tiles: row max/sum, then normalized probabilities).

``draftopt::select_blocks(P, sparsity, policy, cdf_threshold) -> (kv_idx, kv_cnt)``:
per (batch, head, query tile) the key tiles to compute, ascending:

- ``"percentile"`` (the paper): per (batch, head) keep the ``ceil((1-s)*S*S)``
  largest entries of P (its (1-s) upper fraction); K = S.
- ``"topk"``: each query tile keeps its ``ceil((1-s)*S)`` best key tiles; K is
  that count (static shapes, the same work per tile).
- ``"cdf"``: each query tile keeps the fewest best key tiles whose draft mass
  reaches ``cdf_threshold``, at most ``ceil((1-s)*S)`` of them; K = S.

Every policy also keeps the diagonal (a tile always sees itself, so no row is
ever empty), and ``sparsity == 0`` keeps everything. The ranking runs on
torch.topk / torch.sort on the device (no host sync); turning the kept set
into index lists is a Triton prefix-sum compaction.

Example:
    >>> from draftopt.kernels import draft_map, select_blocks
    >>> P = draft_map(torch.randn(1, 2, 6, 64), torch.randn(1, 2, 6, 64), 0.125)
    >>> kv_idx, kv_cnt = select_blocks(P, sparsity=0.5, policy="topk")
    >>> kv_idx.shape, kv_cnt.tolist()[0][0]
    (torch.Size([1, 2, 6, 3]), [3, 3, 3, 3, 3, 3])
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ._common import LOG2E, alloc, launcher, make_inference_only, next_pow2, refuse_grad, use_triton

POLICIES = ("percentile", "topk", "cdf")


def check_selection_args(sparsity: float, policy: str, cdf_threshold: float) -> None:
    if not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {POLICIES}")
    if not isinstance(cdf_threshold, (int, float)) or not 0.0 < cdf_threshold <= 1.0:
        raise ValueError(f"cdf_threshold must be a number in (0, 1], got {cdf_threshold!r}")


def keep_count(sparsity: float, n: int) -> int:
    """ceil((1 - sparsity) * n), at least 1; rounded first so 0.1 * 100 is 10, not 11."""
    return max(1, math.ceil(round((1.0 - sparsity) * n, 6)))


# -- draft map -------------------------------------------------------------------
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
    B, H, S, D = q_pool.shape
    q_pool, k_pool = q_pool.float().contiguous(), k_pool.float().contiguous()
    out = alloc((B, H, S, S), torch.float32, q_pool.device)
    block = 64
    launcher(_draft_map_kernel)[(triton.cdiv(S, block), B * H)](
        q_pool, k_pool, out,
        q_pool.stride(0), q_pool.stride(1), q_pool.stride(2),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        H, S, D, scale * LOG2E,
        BLOCK_M=block, BLOCK_N=block, BLOCK_D=max(16, next_pow2(D)),
    )
    return out


def draft_map_reference(q_pool: torch.Tensor, k_pool: torch.Tensor, scale: float) -> torch.Tensor:
    acc = torch.float64 if q_pool.dtype == torch.float64 else torch.float32
    scores = q_pool.to(acc) @ k_pool.to(acc).transpose(-1, -2) * scale
    return torch.softmax(scores, dim=-1)


@triton_op("draftopt::draft_map", mutates_args=())
def _draft_map_op(q_pool: torch.Tensor, k_pool: torch.Tensor, scale: float) -> torch.Tensor:
    if use_triton(q_pool):
        return draft_map_triton(q_pool, k_pool, scale)
    return draft_map_reference(q_pool, k_pool, scale)


make_inference_only(_draft_map_op, "draft_map")


# -- policies: which blocks to keep -----------------------------------------------
def _with_diagonal(keep: torch.Tensor) -> torch.Tensor:
    S = keep.shape[-1]
    return keep | torch.eye(S, dtype=torch.bool, device=keep.device)


def _keep_percentile(P: torch.Tensor, sparsity: float) -> torch.Tensor:
    B, H, S, _ = P.shape
    flat = P.reshape(B, H, S * S)
    top = flat.topk(keep_count(sparsity, S * S), dim=-1, sorted=False).indices
    keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, top, True)
    return _with_diagonal(keep.reshape(B, H, S, S))


def _keep_cdf(P: torch.Tensor, sparsity: float, threshold: float) -> torch.Tensor:
    S = P.shape[-1]
    vals, order = P.sort(dim=-1, descending=True)
    mass_before = vals.cumsum(dim=-1) - vals
    rank = torch.arange(S, device=P.device)
    keep_sorted = (mass_before < threshold) & (rank < keep_count(sparsity, S))
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return _with_diagonal(keep)


def _topk_indices(P: torch.Tensor, sparsity: float) -> torch.Tensor:
    S = P.shape[-1]
    diag = torch.eye(S, dtype=torch.bool, device=P.device)
    forced = P.masked_fill(diag, float("inf"))  # the diagonal always wins a slot
    idx = forced.topk(keep_count(sparsity, S), dim=-1, sorted=False).indices
    return idx.sort(dim=-1).values.to(torch.int32)


# -- compaction: kept set -> ascending index lists ----------------------------------
@triton.jit
def _compact_kernel(Keep, Idx, Cnt, S, K, BLOCK_C: tl.constexpr):
    """Row r of Keep [rows, S] -> Idx[r, :cnt] = kept columns ascending, rest = diagonal."""
    row = tl.program_id(0).to(tl.int64)
    diag = (row % S).to(tl.int32)
    count = 0
    for c0 in range(0, S, BLOCK_C):
        offs = c0 + tl.arange(0, BLOCK_C)
        keep = tl.load(Keep + row * S + offs, mask=offs < S, other=0).to(tl.int32)
        pos = count + tl.cumsum(keep, axis=0) - keep
        tl.store(Idx + row * K + pos, offs.to(tl.int32), mask=(keep != 0) & (pos < K))
        count += tl.sum(keep, axis=0)
    count = tl.minimum(count, K)
    for c0 in range(0, K, BLOCK_C):  # unused slots point at the diagonal: always a valid tile
        offs = c0 + tl.arange(0, BLOCK_C)
        fill = tl.zeros([BLOCK_C], dtype=tl.int32) + diag
        tl.store(Idx + row * K + offs, fill, mask=(offs < K) & (offs >= count))
    tl.store(Cnt + row, count.to(tl.int32))


def compact_triton(keep: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, S, _ = keep.shape
    keep_u8 = keep.to(torch.uint8)  # Inductor cannot lower a bool -> uint8 view
    idx = alloc((B, H, S, K), torch.int32, keep.device)
    cnt = alloc((B, H, S), torch.int32, keep.device)
    launcher(_compact_kernel)[(B * H * S,)](keep_u8, idx, cnt, S, K, BLOCK_C=min(1024, next_pow2(S)))
    return idx, cnt


def compact_reference(keep: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    S = keep.shape[-1]
    order = torch.sort(keep.to(torch.uint8), dim=-1, descending=True, stable=True).indices[..., :K]
    cnt = keep.sum(dim=-1).clamp(max=K)
    diag = torch.arange(S, device=keep.device)[:, None].expand(S, K)
    live = torch.arange(K, device=keep.device) < cnt[..., None]
    return torch.where(live, order, diag).to(torch.int32), cnt.to(torch.int32)


def dense_indices(B: int, H: int, S: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(kv_idx, kv_cnt) that keep every tile: what any policy selects at sparsity 0."""
    idx = torch.arange(S, dtype=torch.int32, device=device).expand(B, H, S, S).contiguous()
    return idx, torch.full((B, H, S), S, dtype=torch.int32, device=device)


@triton_op("draftopt::select_blocks", mutates_args=())
def _select_blocks_op(
    P: torch.Tensor, sparsity: float, policy: str, cdf_threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, S, _ = P.shape
    if sparsity == 0.0:
        return dense_indices(B, H, S, P.device)
    if policy == "topk":
        idx = _topk_indices(P, sparsity)
        return idx, torch.full((B, H, S), idx.shape[-1], dtype=torch.int32, device=P.device)
    keep = _keep_percentile(P, sparsity) if policy == "percentile" else _keep_cdf(P, sparsity, cdf_threshold)
    return compact_triton(keep, S) if use_triton(P) else compact_reference(keep, S)


make_inference_only(_select_blocks_op, "select_blocks")


# -- public wrappers ----------------------------------------------------------------
def draft_map(q_pool: torch.Tensor, k_pool: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q_pool @ k_pool^T * scale) over the last dim, float32 [B, heads, S, S]."""
    if q_pool.dim() != 4 or q_pool.shape != k_pool.shape:
        raise ValueError(
            f"draft_map expects q_pool and k_pool of one shape [B, heads, S, D], got "
            f"{tuple(q_pool.shape)} and {tuple(k_pool.shape)}"
        )
    refuse_grad("draft_map", q_pool, k_pool)
    return torch.ops.draftopt.draft_map(q_pool, k_pool, float(scale))


def select_blocks(
    P: torch.Tensor, sparsity: float = 0.9, policy: str = "percentile", cdf_threshold: float = 0.9
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose key tiles per query tile from the draft map ``P``: (kv_idx int32, kv_cnt int32)."""
    check_selection_args(sparsity, policy, cdf_threshold)
    if P.dim() != 4 or P.shape[-1] != P.shape[-2]:
        raise ValueError(f"select_blocks expects a draft map [B, heads, S, S], got {tuple(P.shape)}")
    return torch.ops.draftopt.select_blocks(P, float(sparsity), policy, float(cdf_threshold))
