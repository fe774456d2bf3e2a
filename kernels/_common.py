"""Small helpers shared by the op files: launching, dtype checks, inference-only autograd."""

from __future__ import annotations

import contextlib
import os

import torch
import triton
from torch.library import wrap_triton
from triton.runtime.jit import JITFunction

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# 1 / ln(2): the kernels use exp2, so scores are pre-multiplied by log2(e).
LOG2E = 1.4426950408889634


def launcher(kernel):
    """``wrap_triton(kernel)``, so torch.compile can see the launch.

    Under ``TRITON_INTERPRET=1`` (the CPU tests) ``triton.jit`` returns an
    interpreted function that ``wrap_triton`` does not accept; it is launched as is.
    """
    return wrap_triton(kernel) if isinstance(kernel, JITFunction) else kernel


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op on ``t`` runs its Triton kernel (CUDA) or its PyTorch path (anything else)."""
    return t.device.type == "cuda"


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(n)


def check_dtype(name: str, t: torch.Tensor, allowed=SUPPORTED_DTYPES) -> None:
    if t.dtype not in allowed:
        raise ValueError(
            f"{name} has dtype {t.dtype}; draftopt kernels take {', '.join(map(str, allowed))}"
        )


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


# Tests set this (``poison_outputs()``) so that every kernel output starts as
# NaN / a huge int: a row a kernel forgot to write cannot pass as a plausible value.
_POISON = os.environ.get("DRAFTOPT_POISON") == "1"
_INT_POISON = -(2**30)


def alloc(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty for kernel outputs, filled with poison when poisoning is on."""
    return _poisoned(torch.empty(shape, dtype=dtype, device=device))


def alloc_like(t: torch.Tensor) -> torch.Tensor:
    """torch.empty_like (same strides where ``t`` is dense), poisoned like ``alloc``."""
    return _poisoned(torch.empty_like(t))


def _poisoned(out: torch.Tensor) -> torch.Tensor:
    if _POISON:
        out.fill_(float("nan") if out.dtype.is_floating_point else _INT_POISON)
    return out


@contextlib.contextmanager
def poison_outputs(enabled: bool = True):
    global _POISON
    old, _POISON = _POISON, enabled
    try:
        yield
    finally:
        _POISON = old
