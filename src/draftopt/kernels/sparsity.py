"""Selection policies in PyTorch, their argument checks and keep counts.

A policy turns a draft map P [B, heads, S, S] into the set of (query tile, key
tile) pairs to compute:

- ``"mass"`` (the default): per (batch, head) keep the ``keep_count(s, S*S)``
  pairs of largest *estimated attention mass* (ops/block_mass.py: the draft
  logit corrected for tile sizes and for the spread of q and k in a tile);
  the map it ranks is ``block_mass``, not the draft map.
- ``"percentile"`` (the paper): per (batch, head) keep the ``keep_count(s, S*S)``
  largest entries of P (its (1 - s) upper fraction).
- ``"topk"``: each query tile keeps its ``keep_count(s, S)`` best key tiles
  (a fixed count: static shapes, the same work per tile).
- ``"cdf"``: each query tile keeps the fewest best key tiles whose draft mass
  reaches ``cdf_threshold``, at most ``keep_count(s, S)`` of them.

Every policy also keeps the diagonal (a tile always sees itself, so no row is
ever empty), and sparsity 0 keeps everything. These functions are the CPU path
of ``draftopt::select_blocks`` and the oracle the GPU paths are tested against.
"""

from __future__ import annotations

import math
import numbers

import torch

POLICIES = ("mass", "percentile", "topk", "cdf")
# Policies that rank each head's whole map (one count per head) rather than each row.
GLOBAL_POLICIES = ("mass", "percentile")


def as_number(x):
    """A float for a Python number, a numpy scalar or a one-element float tensor; ``x`` itself otherwise
    (the check that follows names it). 32-bit and narrower values are read to 7 significant digits, so
    np.float32(0.9) is 0.9 (keep counts round up: 0.8999999761 would keep one block more)."""
    if isinstance(x, bool):
        return x
    if isinstance(x, torch.Tensor) and x.numel() == 1 and x.dtype.is_floating_point:
        narrow = x.dtype != torch.float64
        x = x.item()
    elif isinstance(x, numbers.Real):
        narrow = getattr(getattr(x, "dtype", None), "itemsize", 8) < 8
        x = float(x)
    else:
        return x
    return float(f"{x:.7g}") if narrow else x


def check_selection_args(sparsity: float, policy: str, cdf_threshold: float) -> tuple[float, float]:
    """ValueError naming a bad argument; else (sparsity, cdf_threshold) as floats."""
    sparsity, cdf_threshold = as_number(sparsity), as_number(cdf_threshold)
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {POLICIES}")
    if isinstance(cdf_threshold, bool) or not isinstance(cdf_threshold, (int, float)) or not 0.0 < cdf_threshold <= 1.0:
        raise ValueError(f"cdf_threshold must be a number in (0, 1], got {cdf_threshold!r}")
    return float(sparsity), float(cdf_threshold)


def keep_count(sparsity: float, n: int) -> int:
    """ceil((1 - sparsity) * n), at least 1; rounded first so 0.1 * 100 is 10, not 11."""
    return max(1, math.ceil(round((1.0 - sparsity) * n, 6)))


def expected_kept_tiles(policy: str, sparsity: float, S: int) -> int:
    """Visual (query tile, key tile) pairs the policy keeps before the diagonal is added (the global
    policies add at most S diagonal pairs, "cdf" at most one a row; "topk" keeps exactly this: the
    diagonal takes one of its slots; for "cdf" it is the budget, an upper bound)."""
    if sparsity == 0.0:
        return S * S
    if policy in GLOBAL_POLICIES:
        return keep_count(sparsity, S * S)
    return S * keep_count(sparsity, S)


def with_diagonal(keep: torch.Tensor) -> torch.Tensor:
    S = keep.shape[-1]
    return keep | torch.eye(S, dtype=torch.bool, device=keep.device)


def keep_percentile(P: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean [B, heads, S, S]: each head's keep_count(s, S*S) largest entries, plus the diagonal."""
    B, H, S, _ = P.shape
    flat = P.reshape(B, H, S * S)
    top = flat.topk(keep_count(sparsity, S * S), dim=-1, sorted=False).indices
    keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, top, True)
    return with_diagonal(keep.reshape(B, H, S, S))


def keep_cdf(P: torch.Tensor, sparsity: float, threshold: float) -> torch.Tensor:
    """Boolean [B, heads, S, S]: per row the fewest best tiles reaching ``threshold`` mass (capped)."""
    S = P.shape[-1]
    vals, order = P.sort(dim=-1, descending=True)
    mass_before = vals.cumsum(dim=-1) - vals
    rank = torch.arange(S, device=P.device)
    keep_sorted = (mass_before < threshold) & (rank < keep_count(sparsity, S))
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return with_diagonal(keep)


def topk_indices(P: torch.Tensor, sparsity: float) -> torch.Tensor:
    """int32 [B, heads, S, K]: each row's K = keep_count(s, S) best tiles, ascending, diagonal included."""
    S = P.shape[-1]
    diag = torch.eye(S, dtype=torch.bool, device=P.device)
    forced = P.masked_fill(diag, float("inf"))  # the diagonal always wins a slot
    idx = forced.topk(keep_count(sparsity, S), dim=-1, sorted=False).indices
    return idx.sort(dim=-1).values.to(torch.int32)


def compact_reference(keep: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept set [B, heads, S, S] -> (kv_idx [.., K] ascending, rest = the diagonal; kv_cnt)."""
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


def guarded_keep(P: torch.Tensor, sparsity: torch.Tensor | float, max_error: torch.Tensor | float) -> torch.Tensor:
    """Boolean [B, heads, S, S] of a global policy with run-time arguments and the quality guard.

    Per (batch, head): the ``keep_count(s, S*S)`` largest entries of P (ties at the threshold all stay),
    widened, where they hold less than ``1 - max_error`` of the head's map mass, to the fewest largest
    entries that hold it; plus the diagonal. ``sparsity`` and ``max_error`` may be 0-d device tensors
    (read on the device: no host sync, so they can change between CUDA-graph replays); max_error 1
    turns the guard off.
    """
    B, H, S, _ = P.shape
    n = S * S
    flat = P.reshape(B, H, n)
    vals = flat.sort(dim=-1, descending=True).values
    if isinstance(sparsity, torch.Tensor):  # read on the device; a gather, for indexing by a tensor would sync
        # a float32 control tensor holds 0.9 as 0.89999998: back to 6 decimals, so the count is keep_count's
        s = torch.round(sparsity.to(torch.float64) * 1e6) / 1e6
        k = torch.ceil(torch.round((1.0 - s) * n, decimals=6)).clamp(1, n).long()
        thr_count = vals.gather(-1, (k - 1).expand(B, H, 1))[..., 0]
    else:  # Python numbers stay on the host: no host-to-device copy (CUDA-graph capture refuses those)
        thr_count = vals[..., keep_count(sparsity, n) - 1]
    cum = vals.to(torch.float64).cumsum(dim=-1)
    keep_share = 1.0 - (max_error.to(torch.float64) if isinstance(max_error, torch.Tensor) else float(max_error))
    j = torch.searchsorted(cum, (keep_share * cum[..., -1:]).contiguous()).clamp(max=n - 1)
    thr_mass = vals.gather(-1, j)[..., 0]
    thr = torch.minimum(thr_count, thr_mass)
    return with_diagonal(flat.ge(thr[..., None]).reshape(B, H, S, S))


def estimated_error(P: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """[B, heads]: the fraction of each head's map mass outside the kept pairs (the guard's estimate of
    the attention mass that sparse attention drops)."""
    total = P.sum(dim=(-2, -1))
    return 1.0 - (P * keep).sum(dim=(-2, -1)) / total
