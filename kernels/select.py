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
ever empty), and ``sparsity == 0`` keeps everything. "percentile" on CUDA runs
as Triton kernels (a sampled bracket, a radix select of each head's threshold
among the few entries inside it, and a compaction of the entries above it;
exactly ``ceil((1-s)*S*S)`` kept per head, ties at the threshold in row-major
order, NaN ranked first, as torch.topk keeps them): 0.27 ms against 0.64 for
torch.topk + compaction at HunyuanVideo 720p on an H100 (``DRAFTOPT_RADIX_SELECT=0``
goes back to torch.topk). Elsewhere the ranking runs on torch.topk / torch.sort.
Nothing synchronizes
with the host; turning a kept set into index lists is a Triton prefix-sum
compaction.

Example:
    >>> from draftopt.kernels import draft_map, select_blocks
    >>> P = draft_map(torch.randn(1, 2, 6, 64), torch.randn(1, 2, 6, 64), 0.125)
    >>> kv_idx, kv_cnt = select_blocks(P, sparsity=0.5, policy="topk")
    >>> kv_idx.shape, kv_cnt.tolist()[0][0]
    (torch.Size([1, 2, 6, 3]), [3, 3, 3, 3, 3, 3])
"""

from __future__ import annotations

import math
import os

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


# -- percentile on CUDA: sample, bracket, radix select, compaction ------------------
# Each entry of P gets an int32 key ordered like the floats. Per head, the
# keep_count-th largest key (the threshold) is found without torch.topk:
#  1. one program per head reads a strided sample of SAMPLE keys and finds two
#     of its order statistics (24 halvings of the key range, each one count),
#     which bracket the threshold's expected place with a margin of
#     SAMPLE_SIGMAS binomial deviations;
#  2. one streaming pass over P (one block per program) counts the keys above
#     the bracket and copies those inside it, with their positions, into a
#     per-head candidate buffer (a block reserves its slots with one atomic);
#  3. four radix passes of 8 bits select the threshold among the candidates:
#     one 256-bin tl.histogram per program, merged by int32 atomics into the
#     head's histogram; every program re-derives the digits picked so far from
#     the earlier histograms (no pick kernel, no host round trip). A head whose
#     bracket missed or whose candidates overflowed the buffer runs the same
#     passes over all of P instead: slower, same result. A bracket holding a
#     single distinct key (heavy ties: zeros, quantized maps) gives the
#     threshold at once;
#  4. the last digit fixes the threshold; where more entries tie with it than
#     may be kept, ties are counted per row (from the candidates' positions, or
#     from P on the slow path) so that the first ones in row-major order stay;
#  5. one pass compacts ``key > threshold``, the kept ties and the diagonal into
#     the index lists, one scatter per row.
# One memset and eight Triton launches; every shape and grid depends on S and
# the sparsity only, so nothing waits for the host and CUDA graphs capture it.
# tl.histogram costs grow with the bin count and with same-bin collisions
# (shared-memory atomics), hence 8-bit digits, and no histogram over all of P
# on the fast path.
SAMPLE = 8192  # sampled keys per head
SAMPLE_WARPS = 16
SAMPLE_SIGMAS = 5.0  # bracket half-width in binomial standard deviations of the sample rank
BRACKET_BLOCK = 1024  # entries of P per program in the bracket pass
BRACKET_WARPS = 4
# On by default: H100, HunyuanVideo 720p at 0.9, CUDA-graphed, 0.267 ms vs 0.643 for
# torch.topk + compaction (benchmarks/select_breakdown.py); test_select.py's GPU tests
# pass. DRAFTOPT_RADIX_SELECT=0 keeps torch.topk (the tests call both paths directly).
RADIX_PERCENTILE = os.environ.get("DRAFTOPT_RADIX_SELECT", "1") == "1"
RADIX_BLOCK = 2048  # entries per histogram call (radix passes)
RADIX_CHUNK = 32768  # entries of P per program in a radix pass over all of P
RADIX_WARPS = 8
TIES_BLOCK = 4096  # candidates per program when counting ties
TIES_ROWS = 64  # rows of P per program when counting ties on the slow path
COMPACT_TILE = 1024  # entries per program tile in the compaction (and the tie count on the slow path)
COMPACT_WARPS = 2
_W = 4 * 256 + 32  # per head: four 256-bin histograms, counters (above, inside, min, max); row ties follow


@triton.jit
def _radix_key(x):
    """float32 -> int32 in the floats' order; -0.0 = +0.0 and every NaN above +inf (torch.topk ranks NaN first)."""
    bits = x.to(tl.int32, bitcast=True)
    bits = tl.where(bits == -2147483648, 0, bits)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return tl.where(x != x, 0x7FFFFFFF, key)


@triton.jit
def _pick_digit(Hist, need):
    """From a 256-bin histogram: the digit of the ``need``-th largest, the rank left within it, its count."""
    bins = tl.arange(0, 256)
    hist = tl.load(Hist + bins)
    at_least = tl.cumsum(hist, axis=0, reverse=True)  # entries whose digit is >= bin
    digit = tl.max(tl.where(at_least >= need, bins, -1), axis=0)
    here = bins == digit
    above = tl.sum(tl.where(here, at_least - hist, 0), axis=0)
    return digit, need - above, tl.sum(tl.where(here, hist, 0), axis=0)


@triton.jit
def _sample_bucket(keys, rank):
    """Lower edge of the 256-key bucket (aligned) holding the sample's ascending ``rank``: 24 halvings
    of the key range, each counting the sample at or below the lower half's top."""
    low = rank.to(tl.int64) * 0 - 2147483648
    for it in tl.static_range(24):  # the bucket is [low, low + 2^(32 - it)) before this step
        top = (low + (1 << (31 - it)) - 1).to(tl.int32)
        at_or_below = tl.sum((keys <= top).to(tl.int32), axis=0)
        low = tl.where(at_or_below > rank, low, low + (1 << (31 - it)))
    return low


@triton.jit
def _sample_kernel(P, St, Hist, n, hs, lo_rank, hi_rank, M: tl.constexpr):
    """St[head, 0:2] = the bracket (lo, hi): from a strided sample of M keys of the head, the lower
    edge of the 256-key bucket of its ascending rank lo_rank and the upper edge of that of rank
    hi_rank (no bound below rank 0 or above rank M - 1)."""
    bh = tl.program_id(0)
    i = tl.arange(0, M).to(tl.int64)
    stride = tl.maximum(n // M, 1)
    jitter = ((i * 2654435761) >> 8) % stride  # a fixed scatter inside each stride
    pos = tl.minimum(i * n // M + jitter, n - 1)
    keys = _radix_key(tl.load(P + bh.to(tl.int64) * n + pos))
    lo = _sample_bucket(keys, tl.maximum(lo_rank, 0))
    hi = _sample_bucket(keys, tl.minimum(hi_rank, M - 1)) + 255
    tl.store(St + bh * 8 + 0, tl.where(lo_rank < 0, -2147483648, lo).to(tl.int32))
    tl.store(St + bh * 8 + 1, tl.where(hi_rank >= M, 2147483647, hi).to(tl.int32))
    tl.store(Hist + bh * hs + 1026, 2147483647)  # least and largest key inside the bracket, so far
    tl.store(Hist + bh * hs + 1027, -2147483648)


@triton.jit
def _bracket_kernel(P, St, Hist, Cand, CandPos, n, cap, hs, BLOCK: tl.constexpr):
    """Counts the keys above the bracket and copies those inside (key, position) to the candidates;
    Hist[head, 1024:1028] = (above, inside, least key inside, largest key inside)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    lo = tl.load(St + bh * 8 + 0)
    hi = tl.load(St + bh * 8 + 1)
    counters = Hist + bh * hs + 1024
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    key = _radix_key(tl.load(P + bh.to(tl.int64) * n + offs, mask=inb, other=0.0))
    tl.atomic_add(counters, tl.sum((inb & (key > hi)).to(tl.int32), axis=0), sem="relaxed")
    h = (inb & (key >= lo) & (key <= hi)).to(tl.int32)
    found = tl.sum(h, axis=0)
    if found > 0:
        at = tl.atomic_add(counters + 1, found, sem="relaxed")
        pos = at + tl.cumsum(h, axis=0) - h
        keep = (h != 0) & (pos < cap)
        tl.store(Cand + bh.to(tl.int64) * cap + pos, key, mask=keep)
        tl.store(CandPos + bh.to(tl.int64) * cap + pos, offs, mask=keep)
        tl.atomic_min(counters + 2, tl.min(tl.where(h != 0, key, 2147483647), axis=0), sem="relaxed")
        tl.atomic_max(counters + 3, tl.max(tl.where(h != 0, key, -2147483648), axis=0), sem="relaxed")


@triton.jit
def _select_domain(St, Hist, bh, n, k, cap, hs):
    """Where a head selects: (mode, domain size, key base, rank wanted, whether the candidates are all
    stored). mode 0: among all of P (the bracket missed); 1: among the candidates, above the
    bracket's low key; 2: the bracket holds a single distinct key, which is the threshold."""
    lo = tl.load(St + bh * 8 + 0)
    above = tl.load(Hist + bh * hs + 1024)
    inside = tl.load(Hist + bh * hs + 1025)
    valid = (above < k) & (k <= above + inside)
    single = valid & (tl.load(Hist + bh * hs + 1026) == tl.load(Hist + bh * hs + 1027))
    stored = valid & (inside <= cap)
    mode = tl.where(single, 2, tl.where(stored, 1, 0))
    size = tl.where(mode == 0, n, tl.where(mode == 1, inside, 0))
    base = tl.where(mode == 0, -2147483648, lo).to(tl.int64)
    need = tl.where(mode == 0, k, k - above)
    return mode, size, base, need, stored


@triton.jit
def _radix_level_kernel(P, St, Hist, Cand, n, k, cap, hs, LEVEL: tl.constexpr,
                        CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Histograms digit LEVEL (bits 32 - 8 * LEVEL and up, of key - base) of the keys whose
    higher digits are those picked so far (grid: programs, heads)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    hrow = Hist + bh * hs
    mode, size, base, need, _ = _select_domain(St, Hist, bh, n, k, cap, hs)
    fast = mode != 0  # candidates (none to histogram where the bracket is a single key)
    prefix = base * 0
    for level in tl.static_range(LEVEL - 1):
        d, need, _ = _pick_digit(hrow + level * 256, need)
        prefix = prefix * 256 + d
    SH: tl.constexpr = 32 - 8 * LEVEL
    if fast:  # candidates: one block per program
        start = pid * BLOCK
        end = tl.minimum(start + BLOCK, size)
    else:
        start = pid * CHUNK
        end = tl.minimum(start + CHUNK, size)
    acc = tl.zeros([256], dtype=tl.int32)
    for c0 in range(start, end, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        inb = offs < end
        if fast:
            key = tl.load(Cand + bh.to(tl.int64) * cap + offs, mask=inb, other=0)
        else:
            key = _radix_key(tl.load(P + bh.to(tl.int64) * n + offs, mask=inb, other=0.0))
        u = key.to(tl.int64) - base  # in [0, 2^32): the key's digits as unsigned
        hit = inb
        if LEVEL > 1:
            hit = hit & ((u >> (SH + 8)) == prefix)
        acc += tl.histogram(((u >> SH) & 255).to(tl.int32), 256, mask=hit)
    tl.atomic_add(hrow + (LEVEL - 1) * 256 + tl.arange(0, 256), acc, mask=acc > 0, sem="relaxed")


@triton.jit
def _radix_ties_kernel(P, St, Hist, CandKey, CandPos, n, k, cap, hs, S, rows_per_program,
                       BLOCK: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Fixes the threshold from the four digits: St[head, 5:8] = (key, entries equal to it to keep,
    whether that is fewer than there are). Where so, adds up each row's ties into the head's
    row counts (Hist[head, _W + row]): from the candidates, or from P on the slow path."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    hrow = Hist + bh * hs
    mode, size, base, need, stored = _select_domain(St, Hist, bh, n, k, cap, hs)
    t = base * 0
    left = need
    for level in tl.static_range(4):
        d, left, count = _pick_digit(hrow + level * 256, left)
        t = t * 256 + d
    single = mode == 2
    thr = tl.where(single, tl.load(hrow + 1026).to(tl.int64), t + base).to(tl.int32)
    need = tl.where(single, need, left)
    count = tl.where(single, tl.load(hrow + 1025), count)
    tie = need < count
    first = pid == 0
    tl.store(St + bh * 8 + 5, thr, mask=first)
    tl.store(St + bh * 8 + 6, need, mask=first)
    tl.store(St + bh * 8 + 7, tie.to(tl.int32), mask=first)
    row_ties = hrow + 1056
    if tie:
        if stored:  # the ties are among the candidates, whose positions were kept
            offs = pid * BLOCK + tl.arange(0, BLOCK)
            ok = offs < tl.load(hrow + 1025)
            key = tl.load(CandKey + bh.to(tl.int64) * cap + offs, mask=ok, other=0)
            pos = tl.load(CandPos + bh.to(tl.int64) * cap + offs, mask=ok, other=0)
            tl.atomic_add(row_ties + pos // S, 1, mask=ok & (key == thr), sem="relaxed")
        else:
            r_end = tl.minimum((pid + 1) * rows_per_program, S)
            for r0 in range(pid * rows_per_program, r_end, ROWS):
                rows = r0 + tl.arange(0, ROWS)
                row_ok = rows < r_end
                p_rows = P + (bh.to(tl.int64) * S + rows)[:, None] * S
                ties = tl.zeros([ROWS], dtype=tl.int32)
                for c0 in range(0, S, BLOCK_C):
                    cols = c0 + tl.arange(0, BLOCK_C)
                    ok = row_ok[:, None] & (cols < S)[None, :]
                    x = tl.load(p_rows + cols[None, :], mask=ok, other=0.0)
                    ties += tl.sum(((_radix_key(x) == thr) & ok).to(tl.int32), axis=1)
                tl.store(row_ties + rows, ties, mask=row_ok)


@triton.jit
def _radix_keep(x, ok, cols, rows, thr, need, ties_before):
    """Kept entries of a [rows, cols] tile: key above the threshold, one of the first ``need`` ties of
    the head (``ties_before`` per row: ties in earlier columns and rows), or the diagonal."""
    key = _radix_key(x)
    e = ((key == thr) & ok).to(tl.int32)
    rank = ties_before[:, None] + tl.cumsum(e, axis=1) - e
    keep = ok & ((key > thr) | ((e != 0) & (rank < need)) | (cols[None, :] == rows[:, None]))
    return keep, tl.sum(e, axis=1)


@triton.jit
def _chunk_keep(p_rows, c0, S, row_ok, rows, thr, need, seen, BLOCK_C: tl.constexpr):
    """Columns c0 .. c0 + BLOCK_C of the rows: (cols, in range, kept, ties seen in this chunk)."""
    cols = c0 + tl.arange(0, BLOCK_C)
    ok = row_ok[:, None] & (cols < S)[None, :]
    x = tl.load(p_rows + cols[None, :], mask=ok, other=0.0)
    keep, n_eq = _radix_keep(x, ok, cols, rows, thr, need, seen)
    return cols, ok, keep, n_eq


@triton.jit
def _radix_compact_kernel(P, St, Hist, Idx, Cnt, S, hs,
                          ROWS: tl.constexpr, BLOCK_C: tl.constexpr, SINGLE: tl.constexpr):
    """Rows of P -> Idx[row, :cnt] = kept columns ascending, Idx[row, cnt:] = the diagonal; K = S.

    Every entry of a row lands in exactly one slot: a kept column at its rank
    among the kept, any other at cnt + its rank among the others (holding the
    diagonal), so one scatter writes the whole row.
    """
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    st = St + bh * 8
    thr = tl.load(st + 5)
    need = tl.load(st + 6)
    tie = tl.load(st + 7)
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_ok = rows < S
    grow = bh.to(tl.int64) * S + rows
    p_rows = P + grow[:, None] * S
    o_rows = Idx + grow[:, None] * S
    ties_before = tl.zeros([ROWS], dtype=tl.int32)
    row_ties = Hist + bh * hs + 1056
    if tie != 0:  # ties in the head's earlier rows (row-major order decides which ties stay)
        r0 = pid * ROWS
        before = r0 * 0
        for j in range(0, r0, 1024):
            offs = j + tl.arange(0, 1024)
            before += tl.sum(tl.load(row_ties + offs, mask=offs < r0, other=0), axis=0)
        mine = tl.load(row_ties + rows, mask=row_ok, other=0)
        ties_before = before + tl.cumsum(mine, axis=0) - mine
    if SINGLE:  # the row fits one tile: read once
        cols = tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (cols < S)[None, :]
        x = tl.load(p_rows + cols[None, :], mask=ok, other=0.0)
        if tie != 0:
            keep, _ = _radix_keep(x, ok, cols, rows, thr, need, ties_before)
        else:
            key = _radix_key(x)
            keep = ok & ((key >= thr) | (cols[None, :] == rows[:, None]))
        ki = keep.to(tl.int32)
        cnt = tl.sum(ki, axis=1)
        ahead = tl.cumsum(ki, axis=1) - ki  # kept entries before this one in the row
        pos = tl.where(keep, ahead, cnt[:, None] + cols[None, :] - ahead)
        tl.store(o_rows + pos, tl.where(keep, cols[None, :], rows[:, None]), mask=ok)
    else:  # long rows: count the kept first, then place them
        cnt = tl.zeros([ROWS], dtype=tl.int32)
        seen = ties_before
        for c0 in range(0, S, BLOCK_C):
            cols, ok, keep, n_eq = _chunk_keep(p_rows, c0, S, row_ok, rows, thr, need, seen, BLOCK_C)
            seen += n_eq
            cnt += tl.sum(keep.to(tl.int32), axis=1)
        done = tl.zeros([ROWS], dtype=tl.int32)
        seen = ties_before
        for c0 in range(0, S, BLOCK_C):
            cols, ok, keep, n_eq = _chunk_keep(p_rows, c0, S, row_ok, rows, thr, need, seen, BLOCK_C)
            seen += n_eq
            ki = keep.to(tl.int32)
            ahead = done[:, None] + tl.cumsum(ki, axis=1) - ki
            pos = tl.where(keep, ahead, cnt[:, None] + cols[None, :] - ahead)
            tl.store(o_rows + pos, tl.where(keep, cols[None, :], rows[:, None]), mask=ok)
            done += tl.sum(ki, axis=1)
    tl.store(Cnt + grow, cnt, mask=row_ok)


def _tile(S: int) -> tuple[int, int]:
    """(rows, columns) of a COMPACT_TILE-entry tile over rows of length S."""
    block_c = min(next_pow2(S), COMPACT_TILE)
    return max(1, min(COMPACT_TILE // block_c, next_pow2(S))), block_c


def _sample_bracket(n: int, k: int, m: int) -> tuple[int, int, int]:
    """Ascending sample ranks (lo, hi) bracketing the k-th largest of n, and the candidate buffer size.

    The sample rank of the threshold is about m * (1 - k/n), binomial with
    standard deviation sqrt(m q (1 - q)); the bracket is that +- SAMPLE_SIGMAS
    deviations (+1 for the discreteness); the buffer holds 1.25x the entries
    such a bracket is expected to catch, plus 2048.
    """
    q = k / n
    centre, sigma = m * (1.0 - q), math.sqrt(m * q * (1.0 - q)) + 1.0
    lo = math.floor(centre - SAMPLE_SIGMAS * sigma) - 1
    hi = math.ceil(centre + SAMPLE_SIGMAS * sigma) + 1
    width = min(hi, m) - max(lo, -1) + 1
    return lo, hi, min(n, math.ceil(width * n / m * 1.25) + 2048)


def percentile_launches(P: torch.Tensor, sparsity: float, cap: int | None = None):
    """The steps of ``percentile_select_triton`` as (name, callable) pairs, its outputs (filled once
    every step ran, in order) and its scratch tensors. Split so that a benchmark can time each step."""
    B, H, S, _ = P.shape
    n, heads = S * S, B * H
    k = keep_count(sparsity, n)
    m = min(SAMPLE, next_pow2(n))
    lo_rank, hi_rank, auto_cap = _sample_bracket(n, k, m)
    cap = max(1, min(n, auto_cap if cap is None else cap))
    hs = _W + S
    dev = P.device
    hist = torch.empty((heads, hs), dtype=torch.int32, device=dev)  # histograms, counters, row ties
    state = alloc((heads, 8), torch.int32, dev)
    cand = alloc((heads, cap), torch.int32, dev)
    cand_pos = alloc((heads, cap), torch.int32, dev)
    idx = alloc((B, H, S, S), torch.int32, dev)
    cnt = alloc((B, H, S), torch.int32, dev)
    block = min(RADIX_BLOCK, next_pow2(n))
    chunk = min(RADIX_CHUNK, block * triton.cdiv(n, block))
    bblock = min(BRACKET_BLOCK, next_pow2(n))
    rows, block_c = _tile(S)

    def sample_step():
        hist.zero_()
        launcher(_sample_kernel)[(heads,)](P, state, hist, n, hs, lo_rank, hi_rank, M=m, num_warps=SAMPLE_WARPS)

    def bracket_step():
        launcher(_bracket_kernel)[(triton.cdiv(n, bblock), heads)](
            P, state, hist, cand, cand_pos, n, cap, hs, BLOCK=bblock, num_warps=BRACKET_WARPS)

    def level_step(level):
        launcher(_radix_level_kernel)[(max(triton.cdiv(n, chunk), triton.cdiv(cap, block)), heads)](
            P, state, hist, cand, n, k, cap, hs, LEVEL=level, CHUNK=chunk, BLOCK=block, num_warps=RADIX_WARPS)

    def ties_step():
        tblock = min(TIES_BLOCK, next_pow2(cap))
        programs = max(triton.cdiv(cap, tblock), triton.cdiv(S, TIES_ROWS))
        launcher(_radix_ties_kernel)[(programs, heads)](
            P, state, hist, cand, cand_pos, n, k, cap, hs, S, triton.cdiv(S, programs), BLOCK=tblock, ROWS=rows,
            BLOCK_C=block_c, num_warps=RADIX_WARPS)

    def compact_step():
        launcher(_radix_compact_kernel)[(triton.cdiv(S, rows), heads)](
            P, state, hist, idx, cnt, S, hs, ROWS=rows, BLOCK_C=block_c, SINGLE=block_c >= S, num_warps=COMPACT_WARPS)

    steps = [("sample -> bracket", sample_step), ("bracket pass", bracket_step)]
    steps += [(f"radix level {lv}", lambda lv=lv: level_step(lv)) for lv in (1, 2, 3, 4)]
    steps += [("threshold + ties", ties_step), ("compaction", compact_step)]
    return steps, (idx, cnt), dict(hist=hist, state=state, cap=cap)


def percentile_select_triton(P: torch.Tensor, sparsity: float, cap: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The "percentile" selection on the GPU: (kv_idx, kv_cnt) with K = S, no host sync.

    Per (batch, head) exactly ``keep_count(sparsity, S*S)`` entries of P are
    kept, the largest ones (NaN ranks above +inf, -0.0 equals +0.0); among
    entries equal to the threshold the first in row-major order stay (what
    torch.topk keeps on CUDA). The diagonal is added on top. ``cap``: the
    candidate buffer per head (tests shrink it to force the path over all of P).
    """
    steps, out, _ = percentile_launches(P.float().contiguous(), sparsity, cap)
    for _, step in steps:
        step()
    return out


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
    if (RADIX_PERCENTILE and policy == "percentile" and use_triton(P)
            and P.dtype in (torch.float32, torch.float16, torch.bfloat16)):
        return percentile_select_triton(P, sparsity)  # float64 keeps topk: float32 keys could tie it
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
