"""The "percentile" selection on the GPU without torch.topk: sample, bracket, radix select, compaction.

Each entry of P gets an int32 key ordered like the floats. Per head, the
keep_count-th largest key (the threshold) is found in these steps:

 1. one program per head reads a strided sample of ``sample`` keys and finds two
    of its order statistics (24 halvings of the key range, each one count),
    which bracket the threshold's expected place with a margin of
    ``sample_sigmas`` binomial deviations;
 2. one streaming pass over P counts the keys above the bracket and copies those
    inside it, with their positions, into a per-head candidate buffer (a block
    reserves its slots with one atomic);
 3. four radix passes of 8 bits select the threshold among the candidates: one
    256-bin tl.histogram per program, merged by int32 atomics into the head's
    histogram; every program re-derives the digits picked so far from the
    earlier histograms (no pick kernel, no host round trip). A head whose
    bracket missed or whose candidates overflowed the buffer runs the same
    passes over all of P instead: slower, same result. A bracket holding a
    single distinct key (heavy ties: zeros, quantized maps) gives the threshold
    at once;
 4. the last digit fixes the threshold; where more entries tie with it than may
    be kept, ties are counted per row so that the first ones in row-major order
    stay (what torch.topk keeps);
 5. one pass compacts ``key > threshold``, the kept ties and the diagonal into
    the index lists, one scatter per row.

One memset and eight launches; every shape and grid depends on S and the
sparsity only, so nothing waits for the host and CUDA graphs capture it.
tl.histogram's cost grows with the bin count and with same-bin collisions
(shared-memory atomics), hence 8-bit digits and no histogram over all of P on
the fast path. Speed against torch.topk: docs/design.md ("Percentile
selection"), measured by benchmarks/select_breakdown.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..sparsity import keep_count
from ._common import launcher, next_pow2


@dataclass(frozen=True)
class RadixSelectConfig:
    """Block sizes and warps of the radix percentile select (tests shrink them for the interpreter)."""

    sample: int = 8192  # sampled keys per head
    sample_warps: int = 16
    sample_sigmas: float = 5.0  # bracket half-width in binomial standard deviations of the sample rank
    bracket_block: int = 1024  # entries of P per program in the bracket pass
    bracket_warps: int = 4
    radix_block: int = 2048  # entries per histogram call (radix passes)
    radix_chunk: int = 32768  # entries of P per program in a radix pass over all of P
    radix_warps: int = 8
    ties_block: int = 4096  # candidates per program when counting ties
    ties_rows: int = 64  # rows of P per program when counting ties on the slow path
    compact_tile: int = 1024  # entries per program tile in the compaction
    compact_warps: int = 2


DEFAULT_CONFIG = RadixSelectConfig()

# Per-head scratch in ``hist`` (int32 [heads, ROW_TIES + S]).
BINS = tl.constexpr(256)  # one radix digit: four histograms of BINS at 0, BINS, 2 BINS, 3 BINS
CNT_ABOVE = tl.constexpr(1024)  # keys above the bracket
CNT_INSIDE = tl.constexpr(1025)  # keys inside the bracket (candidates, also those past the buffer)
KEY_MIN = tl.constexpr(1026)  # least key inside the bracket
KEY_MAX = tl.constexpr(1027)  # largest key inside the bracket
ROW_TIES = tl.constexpr(1056)  # from here: per row of P, the entries equal to the threshold
# Per-head state in ``state`` (int32 [heads, ST_WIDTH]).
ST_LO = tl.constexpr(0)  # the bracket's lower key
ST_HI = tl.constexpr(1)  # the bracket's upper key
ST_THR = tl.constexpr(5)  # the threshold key
ST_NEED = tl.constexpr(6)  # entries equal to the threshold to keep
ST_TIE = tl.constexpr(7)  # 1 where fewer ties are kept than there are
ST_WIDTH = tl.constexpr(8)


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
    """St[head, ST_LO:ST_HI + 1] = the bracket (lo, hi): from a strided sample of M keys of the head, the lower
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
    tl.store(St + bh * ST_WIDTH + ST_LO, tl.where(lo_rank < 0, -2147483648, lo).to(tl.int32))
    tl.store(St + bh * ST_WIDTH + ST_HI, tl.where(hi_rank >= M, 2147483647, hi).to(tl.int32))
    tl.store(Hist + bh * hs + KEY_MIN, 2147483647)  # least and largest key inside the bracket, so far
    tl.store(Hist + bh * hs + KEY_MAX, -2147483648)


@triton.jit
def _bracket_kernel(P, St, Hist, Cand, CandPos, n, cap, hs, BLOCK: tl.constexpr):
    """Counts the keys above the bracket and copies those inside (key, position) to the candidates;
    Hist[head, CNT_ABOVE:KEY_MAX + 1] = (above, inside, least key inside, largest key inside)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    lo = tl.load(St + bh * ST_WIDTH + ST_LO)
    hi = tl.load(St + bh * ST_WIDTH + ST_HI)
    hrow = Hist + bh * hs
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    key = _radix_key(tl.load(P + bh.to(tl.int64) * n + offs, mask=inb, other=0.0))
    tl.atomic_add(hrow + CNT_ABOVE, tl.sum((inb & (key > hi)).to(tl.int32), axis=0), sem="relaxed")
    h = (inb & (key >= lo) & (key <= hi)).to(tl.int32)
    found = tl.sum(h, axis=0)
    if found > 0:
        at = tl.atomic_add(hrow + CNT_INSIDE, found, sem="relaxed")
        pos = at + tl.cumsum(h, axis=0) - h
        keep = (h != 0) & (pos < cap)
        tl.store(Cand + bh.to(tl.int64) * cap + pos, key, mask=keep)
        tl.store(CandPos + bh.to(tl.int64) * cap + pos, offs, mask=keep)
        tl.atomic_min(hrow + KEY_MIN, tl.min(tl.where(h != 0, key, 2147483647), axis=0), sem="relaxed")
        tl.atomic_max(hrow + KEY_MAX, tl.max(tl.where(h != 0, key, -2147483648), axis=0), sem="relaxed")


@triton.jit
def _select_domain(St, Hist, bh, n, k, cap, hs):
    """Where a head selects: (mode, domain size, key base, rank wanted, whether the candidates are all
    stored). mode 0: among all of P (the bracket missed); 1: among the candidates, above the
    bracket's low key; 2: the bracket holds a single distinct key, which is the threshold."""
    lo = tl.load(St + bh * ST_WIDTH + ST_LO)
    above = tl.load(Hist + bh * hs + CNT_ABOVE)
    inside = tl.load(Hist + bh * hs + CNT_INSIDE)
    valid = (above < k) & (k <= above + inside)
    single = valid & (tl.load(Hist + bh * hs + KEY_MIN) == tl.load(Hist + bh * hs + KEY_MAX))
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
        d, need, _ = _pick_digit(hrow + level * BINS, need)
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
    tl.atomic_add(hrow + (LEVEL - 1) * BINS + tl.arange(0, BINS), acc, mask=acc > 0, sem="relaxed")


@triton.jit
def _radix_ties_kernel(P, St, Hist, CandKey, CandPos, n, k, cap, hs, S, rows_per_program,
                       BLOCK: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Fixes the threshold from the four digits: St[head, ST_THR:ST_TIE + 1] = (key, entries equal to it to keep,
    whether that is fewer than there are). Where so, adds up each row's ties into the head's
    row counts (Hist[head, ROW_TIES + row]): from the candidates, or from P on the slow path."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    hrow = Hist + bh * hs
    mode, size, base, need, stored = _select_domain(St, Hist, bh, n, k, cap, hs)
    t = base * 0
    left = need
    for level in tl.static_range(4):
        d, left, count = _pick_digit(hrow + level * BINS, left)
        t = t * 256 + d
    single = mode == 2
    thr = tl.where(single, tl.load(hrow + KEY_MIN).to(tl.int64), t + base).to(tl.int32)
    need = tl.where(single, need, left)
    count = tl.where(single, tl.load(hrow + CNT_INSIDE), count)
    tie = need < count
    first = pid == 0
    tl.store(St + bh * ST_WIDTH + ST_THR, thr, mask=first)
    tl.store(St + bh * ST_WIDTH + ST_NEED, need, mask=first)
    tl.store(St + bh * ST_WIDTH + ST_TIE, tie.to(tl.int32), mask=first)
    row_ties = hrow + ROW_TIES
    if tie:
        if stored:  # the ties are among the candidates, whose positions were kept
            offs = pid * BLOCK + tl.arange(0, BLOCK)
            ok = offs < tl.load(hrow + CNT_INSIDE)
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
    st = St + bh * ST_WIDTH
    thr = tl.load(st + ST_THR)
    need = tl.load(st + ST_NEED)
    tie = tl.load(st + ST_TIE)
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_ok = rows < S
    grow = bh.to(tl.int64) * S + rows
    p_rows = P + grow[:, None] * S
    o_rows = Idx + grow[:, None] * S
    ties_before = tl.zeros([ROWS], dtype=tl.int32)
    row_ties = Hist + bh * hs + ROW_TIES
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


def _tile(S: int, config: RadixSelectConfig) -> tuple[int, int]:
    """(rows, columns) of a ``compact_tile``-entry tile over rows of length S."""
    block_c = min(next_pow2(S), config.compact_tile)
    return max(1, min(config.compact_tile // block_c, next_pow2(S))), block_c


def _sample_bracket(n: int, k: int, m: int, sigmas: float) -> tuple[int, int, int]:
    """Ascending sample ranks (lo, hi) bracketing the k-th largest of n, and the candidate buffer size.

    The sample rank of the threshold is about m * (1 - k/n), binomial with
    standard deviation sqrt(m q (1 - q)); the bracket is that +- ``sigmas``
    deviations (+1 for the discreteness); the buffer holds 1.25x the entries
    such a bracket is expected to catch, plus 2048.
    """
    q = k / n
    centre, sigma = m * (1.0 - q), math.sqrt(m * q * (1.0 - q)) + 1.0
    lo = math.floor(centre - sigmas * sigma) - 1
    hi = math.ceil(centre + sigmas * sigma) + 1
    width = min(hi, m) - max(lo, -1) + 1
    return lo, hi, min(n, math.ceil(width * n / m * 1.25) + 2048)


def percentile_launches(P: torch.Tensor, sparsity: float, cap: int | None = None,
                        config: RadixSelectConfig = DEFAULT_CONFIG):
    """The steps of ``percentile_select_triton`` as (name, callable) pairs, its outputs (filled once
    every step ran, in order) and its scratch tensors. Split so that a benchmark can time each step."""
    B, H, S, _ = P.shape
    n, heads = S * S, B * H
    k = keep_count(sparsity, n)
    m = min(config.sample, next_pow2(n))
    lo_rank, hi_rank, auto_cap = _sample_bracket(n, k, m, config.sample_sigmas)
    cap = max(1, min(n, auto_cap if cap is None else cap))
    hs = ROW_TIES.value + S
    dev = P.device
    hist = torch.empty((heads, hs), dtype=torch.int32, device=dev)  # histograms, counters, row ties
    state = torch.empty((heads, ST_WIDTH.value), dtype=torch.int32, device=dev)
    cand = torch.empty((heads, cap), dtype=torch.int32, device=dev)
    cand_pos = torch.empty((heads, cap), dtype=torch.int32, device=dev)
    idx = torch.empty((B, H, S, S), dtype=torch.int32, device=dev)
    cnt = torch.empty((B, H, S), dtype=torch.int32, device=dev)
    block = min(config.radix_block, next_pow2(n))
    chunk = min(config.radix_chunk, block * triton.cdiv(n, block))
    bblock = min(config.bracket_block, next_pow2(n))
    rows, block_c = _tile(S, config)

    def sample_step():
        hist.zero_()  # a step of its own, so that a replayed graph starts from zeros
        launcher(_sample_kernel)[(heads,)](P, state, hist, n, hs, lo_rank, hi_rank, M=m,
                                           num_warps=config.sample_warps)

    def bracket_step():
        launcher(_bracket_kernel)[(triton.cdiv(n, bblock), heads)](
            P, state, hist, cand, cand_pos, n, cap, hs, BLOCK=bblock, num_warps=config.bracket_warps)

    def level_step(level):
        launcher(_radix_level_kernel)[(max(triton.cdiv(n, chunk), triton.cdiv(cap, block)), heads)](
            P, state, hist, cand, n, k, cap, hs, LEVEL=level, CHUNK=chunk, BLOCK=block,
            num_warps=config.radix_warps)

    def ties_step():
        tblock = min(config.ties_block, next_pow2(cap))
        programs = max(triton.cdiv(cap, tblock), triton.cdiv(S, config.ties_rows))
        launcher(_radix_ties_kernel)[(programs, heads)](
            P, state, hist, cand, cand_pos, n, k, cap, hs, S, triton.cdiv(S, programs), BLOCK=tblock, ROWS=rows,
            BLOCK_C=block_c, num_warps=config.radix_warps)

    def compact_step():
        launcher(_radix_compact_kernel)[(triton.cdiv(S, rows), heads)](
            P, state, hist, idx, cnt, S, hs, ROWS=rows, BLOCK_C=block_c, SINGLE=block_c >= S,
            num_warps=config.compact_warps)

    steps = [("sample -> bracket", sample_step), ("bracket pass", bracket_step)]
    steps += [(f"radix level {lv}", lambda lv=lv: level_step(lv)) for lv in (1, 2, 3, 4)]
    steps += [("threshold + ties", ties_step), ("compaction", compact_step)]
    return steps, (idx, cnt), dict(hist=hist, state=state, cap=cap)


def percentile_select_triton(P: torch.Tensor, sparsity: float, cap: int | None = None,
                             config: RadixSelectConfig = DEFAULT_CONFIG) -> tuple[torch.Tensor, torch.Tensor]:
    """The "percentile" selection on the GPU: (kv_idx, kv_cnt) with K = S, no host sync.

    Per (batch, head) exactly ``keep_count(sparsity, S*S)`` entries of P are
    kept, the largest ones (NaN ranks above +inf, -0.0 equals +0.0); among
    entries equal to the threshold the first in row-major order stay (what
    torch.topk keeps on CUDA). The diagonal is added on top. ``cap``: the
    candidate buffer per head (tests shrink it to force the path over all of P).
    """
    steps, out, _ = percentile_launches(P.float().contiguous(), sparsity, cap, config)
    for _, step in steps:
        step()
    return out
