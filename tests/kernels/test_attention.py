"""Stage 4 alone: the block-sparse flash-attention kernel and its op (and stages 3-5 fused)."""

import re

import pytest
import torch
from torch.library import opcheck

from draftopt.kernels import Geometry, block_sparse_attention, permute_tiles, tiled_attention, unpermute_tiles
from draftopt.kernels.gluon import _sm90_kernel
from draftopt.kernels.ops import attention as attention_ops
from draftopt.kernels.triton.attention import block_sparse_attention_triton, tiled_attention_triton

from ..helpers import (attention_backend, key_bias_for, masked_reference, poison_outputs, random_block_mask,
                       skip_interpreted_bf16)
from .tolerances import DTYPES, assert_close


def run_case(device, g, B, H, D, dtype, density, impl, tuning=None, visual_bias=True, layout="bhld"):
    q, k, v = (torch.randn(B, H, g.seq_len, D, device=device).to(dtype) for _ in range(3))
    if layout == "blhd":  # SDPA's usual input: a transposed view of [B, L, heads, D]
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    kv_idx, kv_cnt = random_block_mask(B, H, g.n_tiles, density, device)
    key_keep = torch.ones(B, g.seq_len, dtype=torch.bool, device=device)
    if g.text_len > 1:  # hide the last text tokens of batch 0 (HunyuanVideo's padded prompt)
        key_keep[0, g.text_offset + g.text_len // 2: g.text_offset + g.text_len] = False
    bias = key_bias_for(g, key_keep, device)
    if impl in ("tiled-triton", "tiled-op"):
        with poison_outputs():
            if impl == "tiled-triton":
                out = tiled_attention_triton(q, k, v, kv_idx, kv_cnt, bias, D**-0.5, g, visual_bias=visual_bias,
                                             tuning=tuning)
            else:
                out = tiled_attention(q, k, v, kv_idx, kv_cnt, g, key_bias=bias)
        assert out.stride() == q.stride(), "the output keeps q's layout (as SDPA does)"
        assert_close(out, masked_reference(q, k, v, g, kv_idx, kv_cnt, key_keep), dtype)
        return
    qp, kp, vp = (permute_tiles(t, g) for t in (q, k, v))
    with poison_outputs():
        if impl == "triton":
            out_p = block_sparse_attention_triton(qp, kp, vp, kv_idx, kv_cnt, bias, D**-0.5, g.block, g.n_text_blocks,
                                                  visual_bias=visual_bias, tuning=tuning)
        else:
            out_p = block_sparse_attention(qp, kp, vp, kv_idx, kv_cnt, g, key_bias=bias)
    out = unpermute_tiles(out_p, g)
    assert_close(out, masked_reference(q, k, v, g, kv_idx, kv_cnt, key_keep), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g, B, H, D", [
    (Geometry((2, 5, 9), (4, 4), 21, "start"), 2, 2, 64),
    (Geometry((1, 7, 6), (4, 4), 0, "end"), 1, 3, 96),
    (Geometry((2, 4, 8), (2, 8), 40, "end"), 3, 1, 32),
    (Geometry((1, 8, 16), (8, 16), 20, "end"), 1, 1, 64),  # 128-token tiles: sub-tiled loops
], ids=["text-start", "no-text-d96", "text-end-b3", "block128"])
def test_kernel_matches_float64(device, g, B, H, D, dtype):
    skip_interpreted_bf16(dtype)
    run_case(device, g, B, H, D, dtype, 0.4, "triton")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", ["triton", "tiled-triton"])
def test_kernel_without_visual_bias(device, impl, dtype):
    """Tiles with no padding and no mask on visual keys: the kernel's bias-free path."""
    skip_interpreted_bf16(dtype)
    g = Geometry((2, 8, 32), (8, 16), 40, "end")
    assert not g.has_visual_padding
    run_case(device, g, 2, 2, 64, dtype, 0.4, impl, visual_bias=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
@pytest.mark.parametrize("g, B, H, D", [
    (Geometry((2, 5, 9), (4, 4), 21, "start"), 2, 2, 64),
    (Geometry((1, 7, 6), (4, 4), 0, "end"), 1, 3, 96),
    (Geometry((1, 8, 16), (8, 16), 20, "end"), 1, 1, 64),
    (Geometry((1, 5, 70), (2, 64), 10, "end"), 1, 2, 32),  # tiles wider than a float32 sub-tile
], ids=["text-start", "no-text-d96", "block128", "wide-tile"])
def test_tiled_kernel_matches_float64(device, g, B, H, D, layout, dtype):
    """Stages 3-5 fused: tiles read in place from original-order q, k, v (contiguous or transposed)."""
    skip_interpreted_bf16(dtype)
    run_case(device, g, B, H, D, dtype, 0.4, "tiled-triton", layout=layout)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tiled_kernel_with_text_on_both_sides(device, dtype):
    """Text before and after the grid (FramePack): each text block read in place as one range of rows."""
    skip_interpreted_bf16(dtype)
    run_case(device, Geometry((2, 5, 9), (4, 4), 19 + 23, 19), 2, 2, 32, dtype, 0.4, "tiled-triton", layout="blhd")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g", [Geometry((3, 13, 27), (8, 16), 77, "end"),
                               Geometry((2, 13, 27), (8, 16), 130 + 77, 130)], ids=["text-end", "text-split"])
def test_tiled_op_matches_float64(device, dtype, g):
    run_case(device, g, 2, 3, 64, dtype, 0.3, "tiled-op", layout="blhd")


def test_tiled_opcheck(device):
    g = Geometry((2, 5, 9), (4, 4), 21, "start")
    q, k, v = (torch.randn(1, g.seq_len, 2, 16, device=device).transpose(1, 2) for _ in range(3))
    kv_idx, kv_cnt = random_block_mask(1, 2, g.n_tiles, 0.5, device)
    bias = key_bias_for(g, torch.ones(1, g.seq_len, dtype=torch.bool, device=device), device)
    opcheck(torch.ops.draftopt.tiled_attention.default,
            (q, k, v, kv_idx, kv_cnt, bias, 0.25, *g.op_args(), True, attention_backend(device)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", [0.1, 0.5, 1.0])
def test_op_matches_float64(device, dtype, density):
    g = Geometry((3, 13, 27), (8, 16), 77, "end")
    run_case(device, g, 2, 3, 64, dtype, density, "op")


def test_opcheck(device):
    g = Geometry((2, 5, 9), (4, 4), 21, "start")
    q, k, v = (torch.randn(1, 2, g.padded_len, 16, device=device) for _ in range(3))
    kv_idx, kv_cnt = random_block_mask(1, 2, g.n_tiles, 0.5, device)
    bias = key_bias_for(g, torch.ones(1, g.seq_len, dtype=torch.bool, device=device), device)
    opcheck(torch.ops.draftopt.block_sparse_attention.default,
            (q, k, v, kv_idx, kv_cnt, bias, 0.25, g.block, g.n_text_blocks, True, attention_backend(device)))


def test_shape_errors(device):
    g = Geometry((2, 4, 4), (4, 4))
    q = torch.randn(1, 1, g.padded_len + 16, 16, device=device)
    kv_idx, kv_cnt = random_block_mask(1, 1, g.n_tiles, 0.5, device)
    with pytest.raises(ValueError, match="tile-major layout"):
        block_sparse_attention(q, q, q, kv_idx, kv_cnt, g)


@pytest.mark.parametrize("mask_shape", [None, (2, 1, 1, -1), (1, -1), (2, 3, 1, -1)])
def test_key_bias_op(device, mask_shape):
    g = Geometry((2, 5, 9), (4, 4), 21, "start")
    mask = None
    if mask_shape is not None:
        mask = torch.rand(*[g.seq_len if d == -1 else d for d in mask_shape], device=device) > 0.3
    args = (mask, 2, 3, *g.op_args(), torch.device(device))
    opcheck(torch.ops.draftopt.key_bias.default, args)
    bias = torch.ops.draftopt.key_bias(*args)
    keep = torch.ones(2, 3, 1, g.seq_len, dtype=torch.bool, device=device) if mask is None else mask.expand(2, 3, 1, g.seq_len)
    want = torch.zeros(keep.shape, device=device).masked_fill(~keep, float("-inf"))[:, :, 0, :, None]
    assert torch.equal(bias.expand(2, 3, -1), permute_tiles(want, g, pad_value=float("-inf"))[..., 0])


# -- the backend argument ------------------------------------------------------------------------
SMALL = Geometry((1, 8, 8), (4, 4), 5, "end")  # 4 tiles of 16 tokens and one text block


def small_case(device, tile_major):
    g = SMALL
    q, k, v = (torch.randn(1, 2, g.padded_len if tile_major else g.seq_len, 16, device=device) for _ in range(3))
    kv_idx, kv_cnt = random_block_mask(1, 2, g.n_tiles, 0.5, device)
    bias = key_bias_for(g, torch.ones(1, g.seq_len, dtype=torch.bool, device=device), device)
    return q, k, v, kv_idx, kv_cnt, bias


def call_op(op, args, backend):
    q, k, v, kv_idx, kv_cnt, bias = args
    if op == "block_sparse_attention":
        return torch.ops.draftopt.block_sparse_attention(q, k, v, kv_idx, kv_cnt, bias, 0.25, SMALL.block,
                                                         SMALL.n_text_blocks, True, backend)
    return torch.ops.draftopt.tiled_attention(q, k, v, kv_idx, kv_cnt, bias, 0.25, *SMALL.op_args(), True, backend)


@pytest.mark.parametrize("op", ["block_sparse_attention", "tiled_attention"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_op_runs_the_kernel_its_backend_names(device, monkeypatch, op, backend):
    """The ops run exactly the backend they are given (on the CPU too, where Triton is interpreted),
    and both backends compute the same."""
    calls = []
    for name in ("block_sparse_attention_triton", "tiled_attention_triton", "block_sparse_attention_reference",
                 "tiled_attention_reference"):
        def spy(*args, _fn=getattr(attention_ops, name), _name=name, **kwargs):
            calls.append(_name)
            return _fn(*args, **kwargs)
        monkeypatch.setattr(attention_ops, name, spy)
    args = small_case(device, tile_major=op == "block_sparse_attention")
    with poison_outputs():
        out = call_op(op, args, backend)
    chosen, other = ("reference", "triton") if backend == "torch" else ("triton", "reference")
    assert calls[0] == f"{op}_{chosen}" and not any(c.endswith(other) for c in calls), calls
    monkeypatch.undo()
    torch.testing.assert_close(out, call_op(op, args, "torch"), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("op", ["block_sparse_attention", "tiled_attention"])
@pytest.mark.parametrize("backend", ["cuda", "Triton", "gluon", ""])
def test_op_refuses_an_unknown_backend(device, op, backend):
    args = small_case(device, tile_major=op == "block_sparse_attention")
    with pytest.raises(ValueError, match=rf"unknown attention backend {re.escape(repr(backend))}; choose one of "
                                         r"\('torch', 'triton', 'gluon_sm90'\)"):
        call_op(op, args, backend)


def test_wrappers_pass_the_backend_on(device):
    q, k, v, kv_idx, kv_cnt, bias = small_case(device, tile_major=False)
    with pytest.raises(ValueError, match="unknown attention backend 'tpu'"):
        tiled_attention(q, k, v, kv_idx, kv_cnt, SMALL, key_bias=bias, backend="tpu")
    qp, kp, vp = (permute_tiles(t, SMALL) for t in (q, k, v))
    with pytest.raises(ValueError, match="unknown attention backend 'tpu'"):
        block_sparse_attention(qp, kp, vp, kv_idx, kv_cnt, SMALL, key_bias=bias, backend="tpu")
    planned = tiled_attention(q, k, v, kv_idx, kv_cnt, SMALL, key_bias=bias)  # backend=None: planned
    named = tiled_attention(q, k, v, kv_idx, kv_cnt, SMALL, key_bias=bias, backend=attention_backend(device))
    torch.testing.assert_close(planned, named, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("op", ["block_sparse_attention", "tiled_attention"])
def test_op_refuses_the_gluon_backend_on_a_cpu_tensor(op):
    """Naming the Hopper kernel for a CPU tensor fails at the call, saying what to do instead."""
    if not _sm90_kernel.HAVE_GLUON:
        pytest.skip(f"this Triton has no Gluon ({_sm90_kernel.IMPORT_ERROR}): test_dispatch covers that error")
    args = small_case("cpu", tile_major=op == "block_sparse_attention")
    with pytest.raises(ValueError, match=r"backend 'gluon_sm90' cannot run this call: not a CUDA tensor \(cpu\); "
                                         r"use backend='triton' or let draftopt plan it"):
        call_op(op, args, "gluon_sm90")


@pytest.mark.parametrize("op", ["block_sparse_attention", "tiled_attention"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_v_reaches_the_same_entries_on_every_backend(device, op, value):
    """A NaN or Inf in v: the PyTorch path (CPU, oracle) and the Triton kernel make the same entries
    non-finite, those of the rows whose kept blocks hold it (a skipped block is never read)."""
    args = list(small_case(device, op == "block_sparse_attention"))
    args[2][0, 1, 5, 3] = value
    outs = [call_op(op, args, backend) for backend in ("torch", "triton")]
    assert outs[0].isfinite().logical_not().any() and outs[0].isfinite().any()
    assert torch.equal(outs[0].isnan(), outs[1].isnan()) and torch.equal(outs[0].isinf(), outs[1].isinf())
