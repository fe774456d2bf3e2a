"""Stage 2b, mask: ``draftopt::select_blocks(P, sparsity, policy, cdf_threshold) -> (kv_idx, kv_cnt)``.

Per (batch, head, query tile) the key tiles to compute, ascending
(``kv_idx[..., :kv_cnt]``), by the policies of sparsity.py. K (the last dim of
kv_idx) is S for "percentile" and "cdf", ``keep_count(s, S)`` for "topk". On
CUDA "percentile" is the radix select of triton/radix_select.py and the
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
from ..sparsity import (check_selection_args, compact_reference, dense_indices, keep_cdf, keep_percentile,
                        topk_indices)
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
    keep = keep_percentile(P, sparsity) if policy == "percentile" else keep_cdf(P, sparsity, cdf_threshold)
    return compact_reference(keep, S)


@triton_op("draftopt::select_blocks", mutates_args=())
def _select_blocks_op(
    P: torch.Tensor, sparsity: float, policy: str, cdf_threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if stage_backend(P) is Backend.TORCH or sparsity == 0.0 or policy == "topk":
        return select_blocks_reference(P, sparsity, policy, cdf_threshold)
    if policy == "percentile" and P.dtype in _RADIX_DTYPES:
        return percentile_select_triton(P, sparsity)
    keep = keep_percentile(P, sparsity) if policy == "percentile" else keep_cdf(P, sparsity, cdf_threshold)
    return compact_triton(keep, P.shape[-1])


make_inference_only(_select_blocks_op, "select_blocks")


def select_blocks(
    P: torch.Tensor, sparsity: float = 0.9, policy: str = "percentile", cdf_threshold: float = 0.9
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose key tiles per query tile from the draft map ``P``: (kv_idx int32, kv_cnt int32)."""
    sparsity, cdf_threshold = check_selection_args(sparsity, policy, cdf_threshold)
    if P.dim() != 4 or P.shape[-1] != P.shape[-2]:
        raise ValueError(f"select_blocks expects a draft map [B, heads, S, S], got {tuple(P.shape)}")
    return torch.ops.draftopt.select_blocks(P, float(sparsity), policy, float(cdf_threshold))
