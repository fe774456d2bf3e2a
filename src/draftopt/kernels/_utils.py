"""Host-side helpers shared by the op files: dtype checks and inference-only autograd."""

from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Register-resident [BLOCK, D] accumulators: beyond 128 the kernels spill.
MAX_HEAD_DIM = 128
# 1 / ln(2): the kernels use exp2, so scores are pre-multiplied by log2(e).
LOG2E = 1.4426950408889634


def check_dtype(name: str, t: torch.Tensor) -> None:
    """Refuse what attention cannot take: non-float dtypes on every device, float64 on the GPU kernels.

    (The PyTorch path also computes float64, which the tests use as their oracle.)
    """
    allowed = SUPPORTED_DTYPES if t.is_cuda else (*SUPPORTED_DTYPES, torch.float64)
    if t.dtype not in allowed:
        raise ValueError(
            f"{name} has dtype {t.dtype}; draftopt takes {', '.join(map(str, allowed))} on {t.device.type}"
        )


def check_mask_dtype(mask: torch.Tensor | None) -> None:
    """An SDPA mask is boolean (True = attend) or additive floating point; integers are refused."""
    if mask is not None and mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise ValueError(f"attn_mask has dtype {mask.dtype}; pass a bool mask (True = attend) or an additive "
                         "float mask (0 = attend, -inf = hide), as scaled_dot_product_attention takes")


def make_inference_only(op, name: str) -> None:
    """Register an autograd formula that refuses: these ops have no backward yet.

    A clear error beats a silently missing gradient. It fires when the
    backward runs; the Python wrappers refuse earlier, at the call.
    """

    def backward(ctx, *grads):
        raise RuntimeError(
            f"draftopt::{name} is inference-only (no backward). Run the model under "
            "torch.no_grad() / torch.inference_mode(), or call it with sparsity=0 "
            "through plain PyTorch attention for training."
        )

    op.register_autograd(backward)


def refuse_grad(fn_name: str, *tensors: torch.Tensor | None) -> None:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(
            f"draftopt.kernels.{fn_name} is inference-only: an input requires grad. "
            "Wrap the call in torch.no_grad() or torch.inference_mode()."
        )
