"""Stage 2a, draft map: ``draftopt::draft_map(q_pool, k_pool, scale) -> P`` [B, heads, S, S] float32.

``softmax(q_pool @ k_pool^T * scale)`` per row; one fused Triton kernel on CUDA.

Example:
    >>> from draftopt.kernels import draft_map
    >>> P = draft_map(torch.randn(1, 2, 6, 64), torch.randn(1, 2, 6, 64), 0.125)
    >>> P.shape, torch.allclose(P.sum(-1), torch.ones(1, 2, 6))
    (torch.Size([1, 2, 6, 6]), True)
"""

from __future__ import annotations

import torch
from torch.library import triton_op

from .._utils import make_inference_only, refuse_grad
from ..dispatch import Backend, stage_backend
from ..triton.draft_map import draft_map_triton


def draft_map_reference(q_pool: torch.Tensor, k_pool: torch.Tensor, scale: float) -> torch.Tensor:
    acc = torch.float64 if q_pool.dtype == torch.float64 else torch.float32
    scores = q_pool.to(acc) @ k_pool.to(acc).transpose(-1, -2) * scale
    return torch.softmax(scores, dim=-1)


@triton_op("draftopt::draft_map", mutates_args=())
def _draft_map_op(q_pool: torch.Tensor, k_pool: torch.Tensor, scale: float) -> torch.Tensor:
    if stage_backend(q_pool) is Backend.TRITON:
        return draft_map_triton(q_pool, k_pool, scale)
    return draft_map_reference(q_pool, k_pool, scale)


make_inference_only(_draft_map_op, "draft_map")


def draft_map(q_pool: torch.Tensor, k_pool: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q_pool @ k_pool^T * scale) over the last dim, float32 [B, heads, S, S]."""
    if q_pool.dim() != 4 or q_pool.shape != k_pool.shape:
        raise ValueError(
            f"draft_map expects q_pool and k_pool of one shape [B, heads, S, D], got "
            f"{tuple(q_pool.shape)} and {tuple(k_pool.shape)}"
        )
    refuse_grad("draft_map", q_pool, k_pool)
    return torch.ops.draftopt.draft_map(q_pool, k_pool, float(scale))
