"""Which attention kernel runs a site, decided once: ``plan(...) -> AttentionPlan``.

The pass (at compile time, on fake tensors), ``draft_attention`` (eagerly) and
the op wrappers all call ``plan``; the ops then take the chosen backend as an
argument and run exactly that kernel. The report shows each site's plan.

Backends:

- ``torch``: the PyTorch reference path (every device but CUDA; the test oracle).
- ``triton``: the Triton kernels (any CUDA GPU).
- ``gluon_sm90``: the Gluon attention kernel for Hopper (sm_90, 16-bit, head dim
  64 or 128, 128-token tiles); the other stages stay Triton.

``fused`` says whether stages 3-5 (permute, attend, unpermute) are one
``tiled_attention`` op; ``in_place`` whether that op's kernel reads the tiles
where they lie (no permuted copies at all) or permutes inside the op;
``fp8`` whether it computes in FP8 (``precision="fp8"``: e4m3 q, k, P and V,
on the Gluon kernel, or simulated by the PyTorch path; e4m3 copies are made
in one pass with the permute, so an FP8 site reads copies, and where a bf16
site would be in place it stores its output in place).

Example:
    >>> from draftopt.kernels import Geometry
    >>> from draftopt.kernels.dispatch import plan
    >>> plan(Geometry((2, 16, 32)), torch.float32, torch.device("cpu"), head_dim=64, batch=1)
    AttentionPlan(backend=<Backend.TORCH: 'torch'>, fused=True, in_place=True, reason='not a CUDA device (cpu)', \
fp8=False, precision='float32')
"""

from __future__ import annotations

import enum
import functools
import logging
from dataclasses import dataclass

import torch

from .geometry import Geometry
from .gluon import _sm90_kernel
from .gluon.attention import BLOCK as SM90_BLOCK
from .gluon.attention import DTYPES as SM90_DTYPES
from .gluon.attention import HEAD_DIMS as SM90_HEAD_DIMS
from .gluon.attention import reads_in_place

log = logging.getLogger(__name__)


class Backend(str, enum.Enum):
    TORCH = "torch"
    TRITON = "triton"
    GLUON_SM90 = "gluon_sm90"


BACKENDS = tuple(b.value for b in Backend)
PRECISIONS = (None, "fp8")  # None: the inputs' own dtype
FP8_NAME = "fp8 e4m3"


@dataclass(frozen=True)
class AttentionPlan:
    """The kernel that runs one attention site, and how its tokens are laid out."""

    backend: Backend
    fused: bool  # stages 3-5 in one op
    in_place: bool  # that op's kernel addresses tiles in place (FP8: its output; it reads e4m3 copies)
    reason: str  # why this backend (for the report)
    fp8: bool = False  # e4m3 q, k, P, V (precision="fp8")
    precision: str = ""  # what the products run in: the dtype's name or FP8_NAME (for the report)

    def describe(self) -> str:
        return describe(self.backend.value, self.fused, self.in_place, self.fp8)


def describe(backend: str, fused: bool, in_place: bool, fp8: bool = False) -> str:
    """A plan in words: "gluon_sm90, fused in place", "triton, separate permutes", ..."""
    if not fused:
        layout = "separate permutes"
    elif fp8 and backend == Backend.GLUON_SM90.value:
        layout = "fused, e4m3 copies in, stored in place" if in_place else "fused, e4m3 copies in"
    else:
        layout = "fused in place" if in_place else "fused, permuted inside"
    return f"{backend}, {layout}"


def check_precision(precision) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be None (the inputs' dtype) or 'fp8'; got {precision!r}")


@functools.lru_cache(maxsize=None)
def _capability(index) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def _warn_no_gluon(error: str) -> None:  # once per process and error
    log.warning("draftopt: the Gluon kernel for sm_90 is unavailable (%s); the slower Triton kernel runs "
                "instead. Install a Triton with Gluon (>= 3.5).", error)


def sm90_misfit(block: int, dtype: torch.dtype, device: torch.device, head_dim: int) -> str | None:
    """Why the Gluon kernel cannot run this site (None: it can)."""
    if device.type != "cuda" or _capability(device.index) != (9, 0):
        return "not an sm_90 GPU"
    if dtype not in SM90_DTYPES:
        return f"dtype {str(dtype).replace('torch.', '')} (the sm_90 kernel takes bfloat16, float16)"
    if head_dim not in SM90_HEAD_DIMS:
        return f"head dim {head_dim} (the sm_90 kernel takes {SM90_HEAD_DIMS})"
    if block != SM90_BLOCK:
        return f"{block}-token tiles (the sm_90 kernel takes {SM90_BLOCK})"
    return None


def plan(geom: Geometry, dtype: torch.dtype, device, head_dim: int, batch: int,
         fuse_permute: bool = True, precision: str | None = None) -> AttentionPlan:
    """The attention kernel for a site of this geometry, dtype, device, head dim and batch.

    Permutes are fused where that is faster (docs/design.md, "Stages 3-5 fused"):
    with the Gluon kernel always (in place at batch 1, permuted inside the op
    otherwise); with the Triton kernel (and the PyTorch path, to keep one graph
    shape) where no tile holds padding rows, as its masked loads cost more than
    the copies there. ``fuse_permute=False`` keeps separate permute ops.

    ``precision="fp8"`` runs FP8 where a kernel has it: the Gluon kernel, and the
    PyTorch path (which simulates it); on a CUDA GPU the Gluon kernel cannot take,
    the site keeps its dtype and ``reason`` says why (the pass warns).
    """
    check_precision(precision)
    device = torch.device(device)
    if device.type != "cuda":
        backend, reason = Backend.TORCH, f"not a CUDA device ({device.type})"
    else:
        misfit = sm90_misfit(geom.block, dtype, device, head_dim)
        if misfit is None and not _sm90_kernel.HAVE_GLUON:
            _warn_no_gluon(repr(_sm90_kernel.IMPORT_ERROR))
            misfit = f"Gluon unavailable ({_sm90_kernel.IMPORT_ERROR})"
        backend = Backend.TRITON if misfit else Backend.GLUON_SM90
        reason = misfit or "sm_90, 16-bit, head dim and tile fit"
    fp8 = precision == "fp8" and backend is not Backend.TRITON
    if precision == "fp8" and not fp8:
        reason = f"{reason}; fp8 needs the sm_90 kernel, so it computes in {_name(dtype)}"
    if backend is Backend.GLUON_SM90:
        fused = bool(fuse_permute)
        in_place = fused and reads_in_place(geom, batch)
    else:
        fused = bool(fuse_permute) and not geom.has_visual_padding
        in_place = fused
    return AttentionPlan(backend, fused, in_place, reason, fp8, FP8_NAME if fp8 else _name(dtype))


def require_precision(att: AttentionPlan, precision: str | None) -> AttentionPlan:
    """``att``, or a ValueError where it cannot give the asked-for precision: eager callers get no silent
    downgrade (the pass keeps the dtype instead, reports it and warns)."""
    if precision == "fp8" and not att.fp8:
        raise ValueError(f"precision='fp8' cannot run here: {att.reason}")
    return att


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_backend(backend: str, q: torch.Tensor, block: int, fp8: bool = False) -> Backend:
    """The backend an op was given, refused with a clear error where it cannot run on ``q``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    chosen = Backend(backend)
    if fp8 and chosen is Backend.TRITON:
        raise ValueError("fp8 attention runs on backend 'gluon_sm90' (Hopper) or 'torch' (simulated), not "
                         "'triton'; pass fp8=False or let draftopt plan it (backend=None)")
    if chosen is Backend.GLUON_SM90:
        if not _sm90_kernel.HAVE_GLUON:
            raise RuntimeError(f"backend 'gluon_sm90' needs Triton's Gluon: {_sm90_kernel.IMPORT_ERROR}")
        if q.device.type == "cuda":
            misfit = sm90_misfit(block, q.dtype, q.device, q.shape[-1])
        else:
            misfit = f"not a CUDA tensor ({q.device})"
        if misfit:
            raise ValueError(f"backend 'gluon_sm90' cannot run this call: {misfit}; use backend='triton' "
                             "or let draftopt plan it (backend=None)")
    return chosen


def stage_backend(t: torch.Tensor) -> Backend:
    """Backend of the stages around attention (pool, draft map, selection, permutes): Triton on CUDA.

    They have one kernel each, so the device decides; only attention has a choice of kernels.
    """
    return Backend.TRITON if t.is_cuda else Backend.TORCH
