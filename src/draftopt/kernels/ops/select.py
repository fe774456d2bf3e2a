"""Stage 2b, mask: ``draftopt::select_blocks(P, sparsity, policy, cdf_threshold) -> (kv_idx, kv_cnt)``.

Per (batch, head, query tile) the key tiles to compute, ascending
(``kv_idx[..., :kv_cnt]``), by the policies of sparsity.py. K (the last dim of
kv_idx) is S for "mass", "percentile" and "cdf", ``keep_count(s, S)`` for "topk".
"mass" ranks its map as "percentile" does (the map differs: ``block_mass``). On
CUDA "mass" and "percentile" are the radix select of triton/radix_select.py and the
other policies compact their kept set with a Triton prefix sum; elsewhere, and
as the test oracle, the PyTorch functions of sparsity.py run. Nothing
synchronizes with the host.

Example:
    >>> from draftopt.kernels import draft_map, select_blocks
    >>> P = draft_map(torch.randn(1, 2, 6, 64), torch.randn(1, 2, 6, 64), 0.125)
    >>> kv_idx, kv_cnt = select_blocks(P, sparsity=0.5, policy="topk")
    >>> kv_idx.shape, kv_cnt.tolist()[0][0]
    (torch.Size([1, 2, 6, 3]), [3, 3, 3, 3, 3, 3])
"""

from __future__ import annotations

import torch
from torch.library import triton_op

from .._utils import make_inference_only
from ..dispatch import Backend, stage_backend
from ..control import control
from ..sparsity import (GLOBAL_POLICIES, check_selection_args, compact_reference, dense_indices, guarded_keep,
                        keep_cdf, keep_percentile, topk_indices)
from ..triton.compact import compact_triton
from ..triton.radix_select import percentile_select_triton

# float64 maps keep torch.topk: the radix select's float32 keys could tie distinct float64 values.
_RADIX_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def select_blocks_reference(P: torch.Tensor, sparsity: float, policy: str,
                            cdf_threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch path: sparsity.py's policies and compaction."""
    B, H, S, _ = P.shape
    if sparsity == 0.0:
        return dense_indices(B, H, S, P.device)
    if policy == "topk":
        idx = topk_indices(P, sparsity)
        return idx, torch.full((B, H, S), idx.shape[-1], dtype=torch.int32, device=P.device)
    keep = keep_percentile(P, sparsity) if policy in GLOBAL_POLICIES else keep_cdf(P, sparsity, cdf_threshold)
    return compact_reference(keep, S)


@triton_op("draftopt::select_blocks", mutates_args=())
def _select_blocks_op(
    P: torch.Tensor, sparsity: float, policy: str, cdf_threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if stage_backend(P) is Backend.TORCH or sparsity == 0.0 or policy == "topk":
        return select_blocks_reference(P, sparsity, policy, cdf_threshold)
    if policy in GLOBAL_POLICIES and P.dtype in _RADIX_DTYPES:
        return percentile_select_triton(P, sparsity)
    keep = keep_percentile(P, sparsity) if policy in GLOBAL_POLICIES else keep_cdf(P, sparsity, cdf_threshold)
    return compact_triton(keep, P.shape[-1])


make_inference_only(_select_blocks_op, "select_blocks")


def select_blocks(
    P: torch.Tensor, sparsity: float = 0.9, policy: str = "mass", cdf_threshold: float = 0.9
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose key tiles per query tile from the draft map ``P``: (kv_idx int32, kv_cnt int32)."""
    sparsity, cdf_threshold = check_selection_args(sparsity, policy, cdf_threshold)
    if P.dim() != 4 or P.shape[-1] != P.shape[-2]:
        raise ValueError(f"select_blocks expects a draft map [B, heads, S, S], got {tuple(P.shape)}")
    return torch.ops.draftopt.select_blocks(P, float(sparsity), policy, float(cdf_threshold))


# custom_op, not triton_op: a compiler must call it at run time (not trace into it), for it reads the
# control tensor's current values.
@torch.library.custom_op("draftopt::select_blocks_guarded", mutates_args=())
def _select_blocks_guarded_op(
    P: torch.Tensor, sparsity: float, max_error: float, control_key: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A global policy's selection with the quality guard (sparsity.guarded_keep), K = S. With
    ``control_key >= 0`` sparsity and max_error come from that RuntimeControl's device tensor."""
    if control_key >= 0:
        values = control(control_key).tensor(P.device)
        sparsity, max_error = values[0], values[1]
    keep = guarded_keep(P, sparsity, max_error)
    if stage_backend(P) is Backend.TORCH:
        return compact_reference(keep, P.shape[-1])
    return compact_triton(keep, P.shape[-1])


@_select_blocks_guarded_op.register_fake
def _(P, sparsity, max_error, control_key):
    B, H, S, _ = P.shape
    return P.new_empty((B, H, S, S), dtype=torch.int32), P.new_empty((B, H, S), dtype=torch.int32)


make_inference_only(_select_blocks_guarded_op, "select_blocks_guarded")


def select_blocks_guarded(P: torch.Tensor, sparsity: float = 0.9, max_error: float = 1.0,
                          control_key: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Each head's largest entries of ``P`` ("mass" / "percentile"), widened where they hold less than
    ``1 - max_error`` of the head's mass: (kv_idx [B, heads, S, S] int32, kv_cnt int32).

    Example:
        >>> P = torch.softmax(torch.randn(1, 2, 8, 8), dim=-1)
        >>> kv_idx, kv_cnt = select_blocks_guarded(P, sparsity=0.9, max_error=0.05)
        >>> bool((kv_cnt.sum(-1) >= 7).all())  # widened past 10% of 64 pairs
        True
    """
    sparsity, _ = check_selection_args(sparsity, "mass", 0.5)
    if control_key < 0 and not 0.0 < float(max_error) <= 1.0:
        raise ValueError(f"max_error must be a number in (0, 1] (1: no guard), got {max_error!r}")
    if P.dim() != 4 or P.shape[-1] != P.shape[-2]:
        raise ValueError(f"select_blocks_guarded expects a map [B, heads, S, S], got {tuple(P.shape)}")
    return torch.ops.draftopt.select_blocks_guarded(P, float(sparsity), float(max_error), int(control_key))
