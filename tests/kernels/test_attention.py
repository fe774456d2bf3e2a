"""Stage 4 alone: the block-sparse flash-attention kernel and its op."""

import os

import pytest
import torch
from torch.library import opcheck

from draftopt.kernels import Geometry, block_sparse_attention, permute_tiles, tiled_attention, unpermute_tiles
from draftopt.kernels._common import poison_outputs
from draftopt.kernels.attention import block_sparse_attention_triton, tiled_attention_triton
from draftopt.kernels.block_mask import indices_to_dense
from draftopt.kernels.select import compact_reference

from . import reference as ref
from .tolerances import DTYPES, assert_close

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def random_block_mask(B, H, S, density, device):
    keep = (torch.rand(B, H, S, S, device=device) < density) | torch.eye(S, dtype=torch.bool, device=device)
    return compact_reference(keep, S)


def key_bias_for(g, key_keep, device):
    """Permuted additive bias: -inf for padding and for keys hidden by key_keep [B, L]."""
    bias = torch.zeros(key_keep.shape[0], 1, g.seq_len, 1, device=device).masked_fill(
        ~key_keep[:, None, :, None], float("-inf"))
    return permute_tiles(bias, g, pad_value=float("-inf"))[..., 0]


def expected(q, k, v, g, kv_idx, kv_cnt, key_keep):
    """Float64 dense attention in original order with the block mask expanded to tokens."""
    allowed = ref.token_mask(indices_to_dense(kv_idx, kv_cnt).cpu(), g.grid, g.tile, g.text_len, g.text_position)
    return ref.attention(q.cpu(), k.cpu(), v.cpu(), allowed, key_keep.cpu())


def run_case(device, g, B, H, D, dtype, density, impl, config=None, visual_bias=True, layout="bhld"):
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
                out = tiled_attention_triton(q, k, v, kv_idx, kv_cnt, bias, D**-0.5, g, visual_bias, config)
            else:
                out = tiled_attention(q, k, v, kv_idx, kv_cnt, g, key_bias=bias)
        assert out.stride() == q.stride(), "the output keeps q's layout (as SDPA does)"
        assert_close(out, expected(q, k, v, g, kv_idx, kv_cnt, key_keep), dtype)
        return
    qp, kp, vp = (permute_tiles(t, g) for t in (q, k, v))
    with poison_outputs():
        if impl == "triton":
            out_p = block_sparse_attention_triton(qp, kp, vp, kv_idx, kv_cnt, bias, D**-0.5, g.block, g.n_text_blocks,
                                                  config, visual_bias)
        else:
            out_p = block_sparse_attention(qp, kp, vp, kv_idx, kv_cnt, g, key_bias=bias)
    out = unpermute_tiles(out_p, g)
    assert_close(out, expected(q, k, v, g, kv_idx, kv_cnt, key_keep), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g, B, H, D", [
    (Geometry((2, 5, 9), (4, 4), 21, "start"), 2, 2, 64),
    (Geometry((1, 7, 6), (4, 4), 0, "end"), 1, 3, 96),
    (Geometry((2, 4, 8), (2, 8), 40, "end"), 3, 1, 32),
    (Geometry((1, 8, 16), (8, 16), 20, "end"), 1, 1, 64),  # 128-token tiles: sub-tiled loops
], ids=["text-start", "no-text-d96", "text-end-b3", "block128"])
def test_kernel_matches_float64(device, g, B, H, D, dtype):
    if INTERPRETED and dtype == torch.bfloat16:
        pytest.skip("triton's CPU interpreter computes tl.dot on bfloat16 wrongly (triton 3.9); checked on GPU")
    run_case(device, g, B, H, D, dtype, 0.4, "triton")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", ["triton", "tiled-triton"])
def test_kernel_without_visual_bias(device, impl, dtype):
    """Tiles with no padding and no mask on visual keys: the kernel's bias-free path."""
    if INTERPRETED and dtype == torch.bfloat16:
        pytest.skip("triton's CPU interpreter computes tl.dot on bfloat16 wrongly (triton 3.9); checked on GPU")
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
    if INTERPRETED and dtype == torch.bfloat16:
        pytest.skip("triton's CPU interpreter computes tl.dot on bfloat16 wrongly (triton 3.9); checked on GPU")
    run_case(device, g, B, H, D, dtype, 0.4, "tiled-triton", layout=layout)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tiled_op_matches_float64(device, dtype):
    run_case(device, Geometry((3, 13, 27), (8, 16), 77, "end"), 2, 3, 64, dtype, 0.3, "tiled-op", layout="blhd")


def test_tiled_opcheck(device):
    g = Geometry((2, 5, 9), (4, 4), 21, "start")
    q, k, v = (torch.randn(1, g.seq_len, 2, 16, device=device).transpose(1, 2) for _ in range(3))
    kv_idx, kv_cnt = random_block_mask(1, 2, g.n_tiles, 0.5, device)
    bias = key_bias_for(g, torch.ones(1, g.seq_len, dtype=torch.bool, device=device), device)
    opcheck(torch.ops.draftopt.tiled_attention.default,
            (q, k, v, kv_idx, kv_cnt, bias, 0.25, *g.op_args(), True))


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
            (q, k, v, kv_idx, kv_cnt, bias, 0.25, g.block, g.n_text_blocks))


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
