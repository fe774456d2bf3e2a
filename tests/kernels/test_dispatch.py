"""dispatch.plan and check_backend: which attention kernel runs a site, decided on the host.

Off the GPU the CUDA branches are exercised with a stand-in device capability
(``dispatch._capability``); nothing here launches a kernel.
"""

import logging

import pytest
import torch

from draftopt.kernels import AttentionPlan, Backend, Geometry, dispatch, plan, tile_layout
from draftopt.kernels.dispatch import check_backend, describe, stage_backend
from draftopt.kernels.gluon import _sm90_kernel

COVERED = Geometry((2, 16, 32), (8, 16), 77, "end")  # the tiles cover the grid exactly
PADDED = Geometry((3, 12, 20), (8, 16), 0, "end")  # edge tiles hold padding rows
CUDA = torch.device("cuda", 0)


@pytest.fixture
def capability(monkeypatch):
    """Set the stand-in compute capability of cuda:0."""
    def set_capability(cap):
        monkeypatch.setattr(dispatch, "_capability", lambda index: cap)
    return set_capability


@pytest.mark.parametrize("fuse_permute", [True, False])
@pytest.mark.parametrize("g", [COVERED, PADDED], ids=["covered", "padded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 2])
def test_plan_on_the_cpu(g, fuse_permute, dtype, batch):
    """Off CUDA the PyTorch path runs; it is fused (in place) iff fuse_permute and no tile holds padding."""
    p = plan(g, dtype, "cpu", head_dim=64, batch=batch, fuse_permute=fuse_permute)
    fused = fuse_permute and not g.has_visual_padding
    assert p == AttentionPlan(Backend.TORCH, fused, fused, "not a CUDA device (cpu)", False, str(dtype)[6:])
    assert p.describe() == ("torch, fused in place" if fused else "torch, separate permutes")


def test_plan_takes_a_device_object_or_string():
    assert plan(COVERED, torch.float16, torch.device("cpu"), 128, 1) == plan(COVERED, torch.float16, "cpu", 128, 1)
    assert plan(COVERED, torch.float16, "meta", 128, 1).reason == "not a CUDA device (meta)"


@pytest.mark.parametrize("batch, in_place", [(1, True), (2, False)])
@pytest.mark.parametrize("g", [COVERED, PADDED, tile_layout((21, 45, 80), "strips").geometry()],
                         ids=["covered", "padded", "strips"])
def test_plan_on_sm90_takes_the_gluon_kernel_fused(capability, g, batch, in_place):
    """On Hopper the Gluon kernel runs stages 3-5 fused, padded or not: in place at batch 1,
    permuting inside the op otherwise."""
    if not _sm90_kernel.HAVE_GLUON:
        pytest.skip(f"this Triton has no Gluon ({_sm90_kernel.IMPORT_ERROR})")
    capability((9, 0))
    p = plan(g, torch.bfloat16, CUDA, head_dim=128, batch=batch)
    assert p == AttentionPlan(Backend.GLUON_SM90, True, in_place, "sm_90, 16-bit, head dim and tile fit", False,
                              "bfloat16")
    assert p.describe() == ("gluon_sm90, fused in place" if in_place else "gluon_sm90, fused, permuted inside")
    separate = plan(g, torch.bfloat16, CUDA, head_dim=128, batch=batch, fuse_permute=False)
    assert (separate.backend, separate.fused, separate.in_place) == (Backend.GLUON_SM90, False, False)


@pytest.mark.parametrize("cap, dtype, head_dim, tile, reason", [
    ((8, 0), torch.bfloat16, 128, (8, 16), "not an sm_90 GPU"),
    ((9, 0), torch.float32, 128, (8, 16), "dtype float32 (the sm_90 kernel takes bfloat16, float16)"),
    ((9, 0), torch.bfloat16, 96, (8, 16), "head dim 96 (the sm_90 kernel takes (64, 128))"),
    ((9, 0), torch.bfloat16, 128, (4, 16), "64-token tiles (the sm_90 kernel takes 128)"),
], ids=["ampere", "float32", "d96", "block64"])
@pytest.mark.parametrize("grid", [(2, 16, 32), (3, 12, 20)], ids=["covered", "padded"])
def test_plan_falls_back_to_triton_with_the_reason(capability, cap, dtype, head_dim, tile, reason, grid):
    """Any other CUDA site runs the Triton kernel, fused only where no tile holds padding rows."""
    capability(cap)
    g = Geometry(grid, tile)
    p = plan(g, dtype, CUDA, head_dim=head_dim, batch=1)
    fused = not g.has_visual_padding
    assert p == AttentionPlan(Backend.TRITON, fused, fused, reason, False, str(dtype)[6:])


def test_plan_without_gluon_warns_once_and_takes_triton(capability, monkeypatch, caplog):
    capability((9, 0))
    monkeypatch.setattr(_sm90_kernel, "HAVE_GLUON", False)
    monkeypatch.setattr(_sm90_kernel, "IMPORT_ERROR", ImportError("no gluon in this build"))
    dispatch._warn_no_gluon.cache_clear()
    with caplog.at_level(logging.WARNING, logger="draftopt.kernels.dispatch"):
        p = plan(COVERED, torch.bfloat16, CUDA, 128, 1)
        plan(COVERED, torch.bfloat16, CUDA, 128, 1)
    dispatch._warn_no_gluon.cache_clear()
    assert p == AttentionPlan(Backend.TRITON, True, True, "Gluon unavailable (no gluon in this build)", False,
                              "bfloat16")
    warnings = [r for r in caplog.records if "Gluon kernel for sm_90 is unavailable" in r.getMessage()]
    assert len(warnings) == 1


@pytest.mark.parametrize("backend", ["cuda", "TORCH", "gluon", "sm90", ""])
def test_check_backend_refuses_unknown_names(backend):
    q = torch.empty(1, 1, 128, 64)
    with pytest.raises(ValueError, match=r"unknown attention backend .*; choose one of "
                                         r"\('torch', 'triton', 'gluon_sm90'\)"):
        check_backend(backend, q, 128)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_check_backend_accepts_torch_and_triton_anywhere(backend):
    assert check_backend(backend, torch.empty(1, 1, 16, 8), 16) is Backend(backend)


def test_check_backend_refuses_gluon_on_a_cpu_tensor(monkeypatch):
    monkeypatch.setattr(_sm90_kernel, "HAVE_GLUON", True)  # the device check, whatever this Triton has
    q = torch.empty(1, 1, 128, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"^backend 'gluon_sm90' cannot run this call: not a CUDA tensor \(cpu\); "
                                         r"use backend='triton' or let draftopt plan it \(backend=None\)$"):
        check_backend("gluon_sm90", q, 128)


def test_check_backend_refuses_gluon_where_the_kernel_does_not_fit(monkeypatch, capability):
    """A CUDA tensor the Gluon kernel cannot take: the reason is sm90_misfit's."""
    monkeypatch.setattr(_sm90_kernel, "HAVE_GLUON", True)
    capability((9, 0))

    class FakeCuda:  # only what check_backend reads of q
        device, dtype, shape = CUDA, torch.bfloat16, (1, 1, 128, 96)

    with pytest.raises(ValueError, match=r"backend 'gluon_sm90' cannot run this call: head dim 96 \(the sm_90 "
                                         r"kernel takes \(64, 128\)\); use backend='triton'"):
        check_backend("gluon_sm90", FakeCuda(), 128)
    FakeCuda.shape = (1, 1, 128, 128)
    assert check_backend("gluon_sm90", FakeCuda(), 128) is Backend.GLUON_SM90


def test_check_backend_without_gluon(monkeypatch):
    monkeypatch.setattr(_sm90_kernel, "HAVE_GLUON", False)
    monkeypatch.setattr(_sm90_kernel, "IMPORT_ERROR", ImportError("no gluon in this build"))
    with pytest.raises(RuntimeError, match="backend 'gluon_sm90' needs Triton's Gluon: no gluon in this build"):
        check_backend("gluon_sm90", torch.empty(1, 1, 128, 128, dtype=torch.bfloat16), 128)


def test_stage_backend_follows_the_device():
    assert stage_backend(torch.empty(1)) is Backend.TORCH
    assert stage_backend(torch.empty(1, device="meta")) is Backend.TORCH


@pytest.mark.parametrize("fused, in_place, words", [
    (True, True, "fused in place"), (True, False, "fused, permuted inside"), (False, False, "separate permutes")])
def test_describe(fused, in_place, words):
    assert describe("triton", fused, in_place) == f"triton, {words}"


@pytest.mark.parametrize("in_place, words", [(True, "fused, e4m3 copies in, stored in place"),
                                             (False, "fused, e4m3 copies in")])
def test_describe_fp8_on_the_gluon_kernel(in_place, words):
    """An FP8 site on the Gluon kernel reads e4m3 copies; "in place" is its output's store alone."""
    assert describe("gluon_sm90", True, in_place, fp8=True) == f"gluon_sm90, {words}"
    assert describe("torch", True, in_place, fp8=True) == describe("torch", True, in_place)
