"""Helpers shared by the test layers: output poisoning, error measures, random maps and block masks.

Model builders and their inputs live in models.py; float64 references in kernels/reference.py.
"""

from __future__ import annotations

import contextlib
import functools
import os

import pytest
import torch

from draftopt.kernels import permute_tiles
from draftopt.kernels.block_mask import indices_to_dense
from draftopt.kernels.sparsity import compact_reference

from .kernels import reference as ref

# Kernel outputs under ``poison_outputs()`` start as this (integers) or NaN (floating point).
INT_POISON = -(2**30)
# Under TRITON_INTERPRET=1 (no GPU: tests/conftest.py sets it) the Triton kernels run on the CPU.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# What the draftopt pass needs to rewrite the tiny test models on the CPU.
CPU_OPTIONS = dict(tile=(4, 4), min_tokens=0, compiler="aot_eager")


# -- poisoned allocations ---------------------------------------------------------------------
def _poison_value(dtype: torch.dtype):
    if dtype.is_floating_point or dtype.is_complex:
        return float("nan")
    if dtype == torch.bool:
        return True
    info = torch.iinfo(dtype)
    if info.min <= INT_POISON <= info.max:
        return INT_POISON
    return info.max if info.min == 0 else info.min  # small integer types: their extreme


def _poisoned(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        if isinstance(out, torch.Tensor) and out.numel():
            with torch.no_grad():  # also for requires_grad=True leaves
                out.fill_(_poison_value(out.dtype))
        return out

    return wrapper


_TORCH_ALLOCATORS = ("empty", "empty_like", "empty_strided")


@contextlib.contextmanager
def poison_outputs():
    """Inside the block, every ``torch.empty``, ``torch.empty_like``, ``torch.empty_strided`` and
    ``Tensor.new_empty`` returns a tensor filled with NaN (floating point) or -(2**30) (integers; the
    type's extreme where that does not fit, True for bool): an output row a kernel forgot to write
    cannot pass as a plausible value.

    The functions themselves are replaced (and restored on exit): a TorchFunctionMode would not
    see the allocations inside the ops' Python implementations, where the dispatcher disables it.
    """
    saved = {name: getattr(torch, name) for name in _TORCH_ALLOCATORS}
    own_new_empty = torch.Tensor.__dict__.get("new_empty")  # normally inherited from torch._C.TensorBase
    for name, fn in saved.items():
        setattr(torch, name, _poisoned(fn))
    torch.Tensor.new_empty = _poisoned(torch.Tensor.new_empty)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch, name, fn)
        if own_new_empty is None:
            del torch.Tensor.new_empty
        else:
            torch.Tensor.new_empty = own_new_empty


# -- measures and masks ------------------------------------------------------------------------
def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float32."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def random_map(B: int, H: int, S: int, device) -> torch.Tensor:
    """A draft map [B, H, S, S] with a wide spread of values (softmax of large random scores): no ties."""
    return torch.softmax(torch.randn(B, H, S, S, device=device) * 3, dim=-1)


def random_block_mask(B: int, H: int, S: int, density: float, device):
    """(kv_idx, kv_cnt) keeping each visual tile pair with probability ``density``, and the diagonal."""
    keep = (torch.rand(B, H, S, S, device=device) < density) | torch.eye(S, dtype=torch.bool, device=device)
    return compact_reference(keep, S)


def kept(kv_idx: torch.Tensor, kv_cnt: torch.Tensor) -> torch.Tensor:
    """The block map [B, H, S, S] (bool, on the CPU) that index lists select."""
    return indices_to_dense(kv_idx, kv_cnt).cpu()


def key_bias_for(g, key_keep: torch.Tensor, device) -> torch.Tensor:
    """Permuted additive key bias [B, 1, Lp]: -inf for padding rows and for keys hidden by key_keep [B, L]."""
    bias = torch.zeros(key_keep.shape[0], 1, g.seq_len, 1, device=device).masked_fill(
        ~key_keep[:, None, :, None], float("-inf"))
    return permute_tiles(bias, g, pad_value=float("-inf"))[..., 0]


def without_visual_bias(bias: torch.Tensor, g) -> torch.Tensor:
    """``bias`` with 0 on every visual key, edge tiles' padding too: a kernel that masks that padding by its
    position (no key mask on the grid) must give the same output from it; one that reads the bias would not."""
    bias = bias.clone()
    bias[..., : g.n_tiles * g.block] = 0.0
    return bias


def masked_reference(q, k, v, g, kv_idx, kv_cnt, key_keep) -> torch.Tensor:
    """Float64 dense attention in the original order, the block mask expanded to tokens (the oracle)."""
    allowed = ref.token_mask(kept(kv_idx, kv_cnt), g.grid, g.tile, g.text_len, g.text_position)
    return ref.attention(q.cpu(), k.cpu(), v.cpu(), allowed, key_keep.cpu())


def attention_backend(device) -> str:
    """The attention backend to name explicitly in op calls on ``device`` (Triton on any GPU)."""
    return "triton" if torch.device(device).type == "cuda" else "torch"


def skip_interpreted_bf16(dtype: torch.dtype) -> None:
    if INTERPRETED and dtype == torch.bfloat16:
        pytest.skip("triton's CPU interpreter computes tl.dot on bfloat16 wrongly (triton 3.9); checked on GPU")
