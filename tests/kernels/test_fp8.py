"""FP8 attention (precision="fp8"): the e4m3 operands (ops/quantize.py, triton/quantize.py), the PyTorch path
that simulates it, the Gluon kernel on Hopper, and how the planner, the ops and the pass choose it.

FP8 is judged by error budgets, not one-ulp tolerances: e4m3 keeps 3 mantissa bits (2**-4 relative), so the
output of random attention is off by ~5% (relative L2) from float64, against ~0.3% for bf16.
"""

import pytest
import torch

import draftopt
from draftopt.kernels import Geometry, dispatch, draft_attention, permute_tiles, tiled_attention, unpermute_tiles
from draftopt.kernels.geometry import permuted_source_index
from draftopt.kernels.gluon import _sm90_kernel
from draftopt.kernels.ops.attention import block_sparse_attention_fp8_reference
from draftopt.kernels.ops.quantize import dequantized, fp8_key_order, fp8_operands_reference
from draftopt.kernels.sparsity import dense_indices
from draftopt.kernels.triton.quantize import fp8_operands_triton

from ..helpers import (INTERPRETED, key_bias_for, masked_reference, poison_outputs, random_block_mask, rel_err,
                       without_visual_bias)

E4M3_EPS = 2.0 ** -4  # half an ulp of e4m3, relative
FP8_BUDGET = 0.08  # relative L2 error against float64 on random inputs (measured 0.052-0.054 on the H200)

GEOMETRIES = [  # (geometry, B, heads, head dim, density)
    (Geometry((2, 16, 32), (8, 16), 77, "end"), 1, 2, 128, 0.3),
    (Geometry((3, 12, 20), (8, 16), 0, "end"), 2, 2, 64, 0.5),  # edge tiles with padding rows
    (Geometry((2, 16, 48), (8, 16), 200, "start"), 1, 3, 128, 1.0),
    (Geometry((3, 9, 21), (8, 16), 40, 13), 1, 1, 64, 0.4),  # text on both sides, odd grid
]
IDS = ["text-end", "padded-d64", "text-start-dense", "split-odd"]


def _inputs(g, B, H, D, device, dtype=torch.float32):
    return tuple(torch.randn(B, H, g.seq_len, D, device=device).to(dtype) for _ in range(3))


def _require_sm90():
    if not (torch.cuda.is_available() and _sm90_kernel.HAVE_GLUON
            and torch.cuda.get_device_capability() == (9, 0)):
        pytest.skip("needs an sm_90 GPU and Triton's Gluon")


# -- operands -----------------------------------------------------------------------------------
@pytest.mark.parametrize("g, B, H, D, density", GEOMETRIES, ids=IDS)
def test_operands_round_trip(g, B, H, D, density):
    """Dequantized operands are the tile-major inputs to e4m3's rounding (k without its mean); padding is 0."""
    q, k, v = _inputs(g, B, H, D, "cpu")
    src = permuted_source_index(g)
    q8, k8, vt8, qs, ks, vs = fp8_operands_reference(q, k, v, src, g.block)
    assert q8.dtype == k8.dtype == vt8.dtype == torch.float8_e4m3fn
    assert tuple(vt8.shape) == (B, H, D, g.padded_len) and tuple(qs.shape) == (B, H, g.n_blocks)
    qd, kd, vd = dequantized(q8, k8, vt8, qs, ks, vs, g.block)
    real = src >= 0
    qp, kp, vp = (permute_tiles(t, g) for t in (q, k, v))
    k_mean = k.mean(2, keepdim=True)
    for got, want in ((qd, qp), (kd, kp - k_mean), (vd, vp)):
        err = (got[:, :, real] - want[:, :, real]).abs()
        scale = want[:, :, real].abs().amax((2, 3), keepdim=True)
        # relative to the element, or to the subnormal step below e4m3's smallest normal (2**-6 of the scale)
        assert (err <= E4M3_EPS * want[:, :, real].abs() + 2.0 ** -9 / 448 * 2 * scale + 1e-7).all()
    assert (q8.float()[:, :, ~real] == 0).all() and (k8.float()[:, :, ~real] == 0).all()
    assert q8.float().abs().max() <= 448 and k8.float().abs().amax((2, 3)).min() == 448


def test_vt8_columns_in_the_kernels_key_order():
    """Column c of V^T holds token fp8_key_order[c] (the order a kernel thread holds 4 keys of P in one
    register), a permutation within each 16 tokens; the natural order does not match."""
    order = fp8_key_order(256)
    assert sorted(order.tolist()) == list(range(256)) and ((order // 16) == torch.arange(256) // 16).all()
    g = Geometry((2, 16, 32), (8, 16))
    q, k, v = _inputs(g, 1, 2, 64, "cpu")
    vt8, vs = (fp8_operands_reference(q, k, v, permuted_source_index(g), g.block)[i] for i in (2, 5))
    got, vt = vt8.float() * vs[..., None, None], permute_tiles(v, g).transpose(2, 3)
    tol = E4M3_EPS * vt.abs().amax() * 2
    assert (got - vt[..., fp8_key_order(g.padded_len)]).abs().max() <= tol
    assert (got - vt).abs().mean() > 0.5 * vt.abs().mean()  # unordered: off by about |v| itself
    with pytest.raises(ValueError, match="multiple of 16"):
        fp8_key_order(24)


def test_operands_leave_nan_in_its_rows():
    """A NaN is left out of every scale and mean: it stays in its own token, the rest quantizes as before (k's
    channel mean counts the NaN as 0, which moves that channel of every key by one constant: no score changes
    but by one number per query row, which the softmax does not see)."""
    g = Geometry((2, 16, 32), (8, 16))
    q, k, v = _inputs(g, 1, 2, 64, "cpu")
    src = permuted_source_index(g)
    for t in (q, k, v):  # 0 where the NaN goes: what the statistics count it as, so no scale can move
        t[0, 0, 5, 3] = 0.0
    clean = fp8_operands_reference(q, k, v, src, g.block)
    for t in (q, k, v):
        t[0, 0, 5, 3] = float("nan")
    dirty = fp8_operands_reference(q, k, v, src, g.block)
    for a, b in zip(clean[3:], dirty[3:]):  # scales
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    row = int((src == 5).nonzero())
    for i, (a, b) in enumerate(zip(clean[:2], dirty[:2])):  # q8: only that element changes; k8: its channel
        changed = a.float() != b.float()
        assert b.float()[0, 0, row, 3].isnan() and b.float().isnan().sum() == 1
        assert changed.sum() == 1 if i == 0 else not changed[..., [d for d in range(64) if d != 3]].any()


def _triton_and_reference_operands(g, B, H, D, device):
    q, k, v = _inputs(g, B, H, D, device, torch.bfloat16 if device == "cuda" else torch.float32)
    q, k = q.transpose(1, 2).contiguous().transpose(1, 2), k * 3 + 1  # strided q; k with a mean to remove
    src = permuted_source_index(g, device)
    with poison_outputs():
        got = fp8_operands_triton(q, k, v, src, g.block)
    return got, fp8_operands_reference(q, k, v, src, g.block)


@pytest.mark.skipif(not INTERPRETED, reason="the CPU interpreter's part; test_triton_operands_on_the_gpu on a GPU")
def test_triton_scales_match_reference_interpreted():
    """The statistics pass and the scales under the interpreter (its e4m3 cast itself is wrong in triton 3.9:
    125.4 -> 64, so the e4m3 tensors are compared on the GPU only)."""
    got, want = _triton_and_reference_operands(*GEOMETRIES[3][:4], "cpu")
    for a, b in zip(got[3:], want[3:]):
        torch.testing.assert_close(a, b, atol=0, rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("g, B, H, D, density", GEOMETRIES, ids=IDS)
def test_triton_operands_on_the_gpu(g, B, H, D, density):
    """The Triton statistics + quantization kernels against the PyTorch operands: the casts round to nearest
    even as PyTorch's do, so the e4m3 tensors match but by one e4m3 step where a float32 scale differs in its
    last bit (the division's rounding: a q block's values on a rounding tie then go the other way, ~1e-4 of
    them, more in some blocks) or k's mean does (its summation order: rare)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    got, want = _triton_and_reference_operands(g, B, H, D, "cuda")
    for a, b in zip(got[3:], want[3:]):
        torch.testing.assert_close(a, b, atol=0, rtol=1e-6)
    q_block_scale_differs = (got[3] != want[3]).repeat_interleave(g.block, dim=2)[..., None]  # [B, H, Lp, 1]
    for i, (a, b) in enumerate(zip(got[:3], want[:3])):
        a, b = a.float(), b.float()
        assert not a.isnan().any()
        differ = a != b
        assert ((a - b).abs()[differ] <= 2 * E4M3_EPS * b.abs()[differ] + 2.0 ** -9).all()
        if i == 0:  # q: only in the blocks whose scale differs
            assert not (differ & ~q_block_scale_differs).any()
        else:  # k, V^T: one scale a head; a flip needs k's mean within an ulp of a tie
            assert differ.float().mean() < 1e-4


# -- the PyTorch path -----------------------------------------------------------------------------
@pytest.mark.parametrize("g, B, H, D, density", GEOMETRIES, ids=IDS)
def test_torch_fp8_error_budget(g, B, H, D, density):
    """The simulated FP8 attention is within FP8's budget of float64, and is really FP8 (far from it)."""
    q, k, v = _inputs(g, B, H, D, "cpu")
    kv_idx, kv_cnt = random_block_mask(B, H, g.n_tiles, density, "cpu")
    keep = torch.ones(B, g.seq_len, dtype=torch.bool)
    want = masked_reference(q, k, v, g, kv_idx, kv_cnt, keep)
    got = tiled_attention(q, k, v, kv_idx, kv_cnt, g, key_bias=key_bias_for(g, keep, "cpu"), precision="fp8")
    assert got.dtype == q.dtype and got.stride() == q.stride()
    assert 5e-3 < rel_err(got, want) < FP8_BUDGET


def test_torch_fp8_nan_propagates_as_dense():
    """NaN in a query row, a key or a value: the same output entries are NaN as in dense attention."""
    g = Geometry((2, 16, 32), (8, 16), 20, "end")
    kv_idx, kv_cnt = dense_indices(1, 1, g.n_tiles, "cpu")
    for which in range(3):
        qkv = list(_inputs(g, 1, 1, 64, "cpu"))
        qkv[which][0, 0, 100, 7] = float("nan")
        dense = torch.nn.functional.scaled_dot_product_attention(*qkv)
        got = tiled_attention(*qkv, kv_idx, kv_cnt, g, precision="fp8")
        torch.testing.assert_close(got.isnan(), dense.isnan(), atol=0, rtol=0)


def test_draft_attention_takes_precision():
    g = Geometry((2, 16, 32), (8, 16), 30, "start")
    q, k, v = _inputs(g, 1, 2, 64, "cpu")
    want = draft_attention(q.double(), k.double(), v.double(), g.grid, text_len=30, text_position="start",
                           sparsity=0.5)
    got = draft_attention(q, k, v, g.grid, text_len=30, text_position="start", sparsity=0.5, precision="fp8")
    assert 5e-3 < rel_err(got, want) < FP8_BUDGET
    with pytest.raises(ValueError, match="precision must be None .* or 'fp8'; got 'int8'"):
        draft_attention(q, k, v, g.grid, text_len=30, text_position="start", precision="int8")


def test_block_sparse_fp8_reference_on_tile_major_inputs():
    """block_sparse_attention(precision='fp8') quantizes the tile-major rows as they are."""
    g = Geometry((2, 16, 32), (8, 16))
    q, k, v = (permute_tiles(t, g) for t in _inputs(g, 1, 2, 64, "cpu"))
    kv_idx, kv_cnt = random_block_mask(1, 2, g.n_tiles, 0.5, "cpu")
    bias = key_bias_for(g, torch.ones(1, g.seq_len, dtype=torch.bool), "cpu")[:, None]
    got = draftopt.kernels.block_sparse_attention(q, k, v, kv_idx, kv_cnt, g, precision="fp8")
    want = block_sparse_attention_fp8_reference(q, k, v, kv_idx, kv_cnt, bias[:, 0], 0.125, g.block, 0)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_fp8_ops_opcheck():
    """tiled_attention (the op the pass emits) with fp8=True on the PyTorch path passes torch.library's checks
    (schema, fake, autograd); block_sparse_attention's FP8 path is the same reference code."""
    from torch.library import opcheck

    g = Geometry((2, 5, 9), (4, 4), 21, "start")
    q, k, v = (torch.randn(1, g.seq_len, 2, 16).transpose(1, 2) for _ in range(3))
    kv_idx, kv_cnt = random_block_mask(1, 2, g.n_tiles, 0.5, "cpu")
    bias = key_bias_for(g, torch.ones(1, g.seq_len, dtype=torch.bool), "cpu")
    opcheck(torch.ops.draftopt.tiled_attention.default,
            (q, k, v, kv_idx, kv_cnt, bias, 0.25, *g.op_args(), True, "torch", True))


# -- planning -------------------------------------------------------------------------------------
@pytest.fixture
def fake_gpu(monkeypatch):
    def with_capability(cap):
        monkeypatch.setattr(dispatch, "_capability", lambda index: cap)
        return torch.device("cuda", 0)
    return with_capability


def test_plan_runs_fp8_on_sm90_and_the_cpu(fake_gpu):
    g = Geometry((2, 16, 32), (8, 16), 77, "end")
    cpu = dispatch.plan(g, torch.float32, "cpu", 64, 1, precision="fp8")
    assert cpu.fp8 and cpu.precision == "fp8 e4m3" and cpu.backend is dispatch.Backend.TORCH
    if _sm90_kernel.HAVE_GLUON:
        sm90 = dispatch.plan(g, torch.bfloat16, fake_gpu((9, 0)), 128, 1, precision="fp8")
        assert sm90.fp8 and sm90.fused and sm90.in_place  # e4m3 copies in, the output stored in place
        assert sm90.describe() == "gluon_sm90, fused, e4m3 copies in, stored in place"
        batched = dispatch.plan(g, torch.bfloat16, fake_gpu((9, 0)), 128, 2, precision="fp8")
        assert batched.fp8 and not batched.in_place and batched.describe() == "gluon_sm90, fused, e4m3 copies in"
        assert dispatch.plan(g, torch.bfloat16, fake_gpu((9, 0)), 128, 1).precision == "bfloat16"


def test_plan_keeps_the_dtype_where_no_fp8_kernel_runs(fake_gpu):
    g = Geometry((2, 16, 32), (8, 16), 77, "end")
    plan = dispatch.plan(g, torch.bfloat16, fake_gpu((8, 0)), 128, 1, precision="fp8")
    assert not plan.fp8 and plan.precision == "bfloat16" and plan.backend is dispatch.Backend.TRITON
    assert "fp8 needs the sm_90 kernel, so it computes in bfloat16" in plan.reason
    with pytest.raises(ValueError, match="precision='fp8' cannot run here: not an sm_90 GPU; fp8 needs"):
        dispatch.require_precision(plan, "fp8")  # what the eager entry points do: no silent downgrade
    assert dispatch.require_precision(plan, None) is plan
    with pytest.raises(ValueError, match="precision must be None"):
        dispatch.plan(g, torch.bfloat16, "cpu", 128, 1, precision="e4m3")


def test_triton_backend_refuses_fp8():
    g = Geometry((2, 16, 32), (8, 16))
    q, k, v = _inputs(g, 1, 1, 64, "cpu")
    kv_idx, kv_cnt = dense_indices(1, 1, g.n_tiles, "cpu")
    with pytest.raises(ValueError, match="fp8 attention runs on backend 'gluon_sm90' .* or 'torch'"):
        tiled_attention(q, k, v, kv_idx, kv_cnt, g, backend="triton", precision="fp8")


def test_config_validates_precision():
    assert draftopt.DraftConfig(precision="fp8").precision == "fp8"
    with pytest.raises(ValueError, match="precision must be None .* got 'bf16'"):
        draftopt.DraftConfig(precision="bf16")


# -- the Gluon kernel (GPU) -------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("visual_bias", [True, False])
@pytest.mark.parametrize("g, B, H, D, density", GEOMETRIES, ids=IDS)
def test_sm90_fp8_matches_reference(g, B, H, D, density, visual_bias):
    """The Gluon FP8 kernel (through tiled_attention, as the pass calls it) against the simulated FP8 path
    (P rounded against the final row maximum there, the running one in the kernel) and float64.
    ``visual_bias`` False (no key mask on the grid): the kernel masks edge tiles' padding by position, so
    it is given a bias that is 0 on every visual key."""
    _require_sm90()
    q, k, v = _inputs(g, B, H, D, "cuda", torch.bfloat16)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # SDPA's [B, L, heads, D] strides
    kv_idx, kv_cnt = random_block_mask(B, H, g.n_tiles, density, "cuda")
    keep = torch.ones(B, g.seq_len, dtype=torch.bool, device="cuda")
    if g.text_len > 1 and visual_bias:  # may hide grid tokens too (text on both sides: the first 7 of the grid)
        keep[0, g.text_offset: g.text_offset + g.text_len // 2] = False
    elif g.text_len > 1:  # text tokens only: no key mask on the grid
        text = torch.ones(g.seq_len, dtype=torch.bool, device="cuda")
        text[g.visual_offset: g.visual_offset + g.n_visual] = False
        keep[0, text & (torch.arange(g.seq_len, device="cuda") % 2 == 0)] = False
    bias = key_bias_for(g, keep, "cuda")
    given = bias if visual_bias else without_visual_bias(bias, g)
    with poison_outputs():
        got = tiled_attention(q, k, v, kv_idx, kv_cnt, g, key_bias=given, visual_bias=visual_bias, precision="fp8")
    assert not got.isnan().any()
    simulated = tiled_attention(q.cpu().float(), k.cpu().float(), v.cpu().float(), kv_idx.cpu(), kv_cnt.cpu(), g,
                                key_bias=bias.cpu(), visual_bias=True, precision="fp8")
    exact = masked_reference(q, k, v, g, kv_idx, kv_cnt, keep)
    assert rel_err(got.cpu(), simulated) < 0.03  # measured 0.019-0.024
    assert rel_err(got.cpu(), exact) < FP8_BUDGET


@pytest.mark.gpu
@pytest.mark.parametrize("g, visual_bias", [
    (Geometry((2, 16, 32), (8, 16), 77, "end"), False),    # tiles cover the grid, text after it
    (Geometry((3, 13, 37), (8, 16), 40, "start"), False),  # edge tiles clipped by the stores, text first
    (Geometry((3, 13, 37), (8, 16), 40, "start"), True),   # ... with a key mask (the bias on every key)
    (Geometry((2, 1, 45 * 20), (1, 128), 77, "end"), False),  # raster strips: split in column halves
], ids=["exact", "padded", "padded-mask", "strips"])
def test_sm90_fp8_output_in_place_matches_tile_major(g, visual_bias):
    """draftopt::attend_sm90_fp8_in_place (the output stored in the original order, batch 1) writes exactly
    what the tile-major op's output is after the unpermute: the same products, only the store differs.
    Poisoned outputs catch a row it does not write."""
    from draftopt.kernels.gluon.attention import edge_grid

    _require_sm90()
    H, D = 3, 128
    q, k, v = _inputs(g, 1, H, D, "cuda", torch.bfloat16)
    kv_idx, kv_cnt = random_block_mask(1, H, g.n_tiles, 0.4, "cuda")
    keep = torch.rand(1, g.seq_len, device="cuda") > 0.1 if visual_bias else torch.ones(
        1, g.seq_len, dtype=torch.bool, device="cuda")
    bias = key_bias_for(g, keep, "cuda")
    bias = bias if visual_bias else without_visual_bias(bias, g)
    operands = fp8_operands_triton(q, k, v, permuted_source_index(g, "cuda"), g.block)
    edges = list(edge_grid(g, visual_bias) or ())
    common = (kv_idx, kv_cnt, bias, D ** -0.5)
    with poison_outputs():
        got = torch.ops.draftopt.attend_sm90_fp8_in_place(*operands, *common, visual_bias, q.dtype, edges,
                                                          *g.op_args())
        tile_major = torch.ops.draftopt.attend_sm90_fp8(*operands, *common, g.n_tiles, g.n_text_blocks,
                                                        visual_bias, q.dtype, edges)
    assert got.shape == q.shape and not got.isnan().any()
    torch.testing.assert_close(got, unpermute_tiles(tile_major, g), atol=0, rtol=0)
    assert rel_err(got.cpu(), masked_reference(q, k, v, g, kv_idx, kv_cnt, keep)) < FP8_BUDGET


def test_fp8_in_place_op_fake_impl_and_refusals():
    """The in-place FP8 op's fake impl (what torch.compile traces) has the original-order shape; the launcher
    refuses a batch or geometry the stores cannot address in place, naming it."""
    from draftopt.kernels.gluon.attention import attend_sm90_fp8

    g = Geometry((2, 13, 37), (8, 16), 77, "end")
    q8 = torch.empty(1, 2, g.padded_len, 128, device="meta", dtype=torch.float8_e4m3fn)
    scales = (torch.empty(1, 2, g.n_blocks, device="meta"), torch.empty(1, 2, device="meta"),
              torch.empty(1, 2, device="meta"))
    kv_idx = torch.empty(1, 2, g.n_tiles, g.n_tiles, device="meta", dtype=torch.int32)
    kv_cnt = torch.empty(1, 2, g.n_tiles, device="meta", dtype=torch.int32)
    bias = torch.empty(1, 1, g.padded_len, device="meta")
    out = torch.ops.draftopt.attend_sm90_fp8_in_place(q8, q8, q8.transpose(2, 3), *scales, kv_idx, kv_cnt, bias,
                                                      0.1, False, torch.bfloat16, [], *g.op_args())
    assert out.shape == (1, 2, g.seq_len, 128) and out.dtype == torch.bfloat16
    split = Geometry((2, 16, 32), (8, 16), 300 + 77, 300)  # text on both sides: one row descriptor cannot
    q8b = torch.empty(2, 2, g.padded_len, 128, device="meta", dtype=torch.float8_e4m3fn)
    for operand, geom in ((q8, split), (q8b, g)):
        with pytest.raises(ValueError, match="cannot write this geometry's output in place"):
            attend_sm90_fp8(operand, None, None, None, None, None, None, None, None, 0.1, 0, 0, False,
                            torch.bfloat16, out_geom=geom)


@pytest.mark.gpu
@pytest.mark.parametrize("g, visual_bias, density", [
    (Geometry((2, 16, 32), (8, 16), 77, "end"), False, 0.4),
    (Geometry((3, 13, 37), (8, 16), 40, "start"), True, 0.4),
    (Geometry((2, 64, 96), (8, 16), 77, "end"), False, 0.9),
], ids=["exact", "padded-mask", "long-key-lists"])
def test_sm90_fp8_rowsum_mma_matches_the_additions(g, visual_bias, density):
    """Sm90Tuning(rowsum_mma=True) in FP8 (the default): the row sums as an e4m3 product P @ ones. Two bugs
    it once had: its B operand held wrong bytes (Triton 3.6 miscompiles the cast of a constant 1.0 to e4m3:
    sums ~4x too large), and one accumulator across all key blocks lost the small terms to FP8 wgmma's
    truncating accumulation (sums 12-25% low at ~60-90 blocks a row: "long-key-lists" has ~87). Now the
    output matches the kernel's with float32 additions (rowsum_mma=False) to FP8 rounding (the sums of the
    rounded P) and float64 within FP8's budget, stored in place as well as tile-major. Poisoned outputs
    catch a row it does not write."""
    from dataclasses import replace

    from draftopt.kernels.gluon.attention import DEFAULT_FP8_TUNING, attend_sm90_fp8, edge_grid

    _require_sm90()
    H, D = (3 if g.seq_len < 8192 else 1), 128  # one head on the long grid: the float64 reference is dense
    q, k, v = _inputs(g, 1, H, D, "cuda", torch.bfloat16)
    kv_idx, kv_cnt = random_block_mask(1, H, g.n_tiles, density, "cuda")
    keep = torch.rand(1, g.seq_len, device="cuda") > 0.1 if visual_bias else torch.ones(
        1, g.seq_len, dtype=torch.bool, device="cuda")
    bias = key_bias_for(g, keep, "cuda")
    bias = bias if visual_bias else without_visual_bias(bias, g)
    operands = fp8_operands_triton(q, k, v, permuted_source_index(g, "cuda"), g.block)
    args = (kv_idx, kv_cnt, bias, D ** -0.5, g.n_tiles, g.n_text_blocks, visual_bias, q.dtype)
    edges = edge_grid(g, visual_bias)
    with poison_outputs():
        got = attend_sm90_fp8(*operands, *args, replace(DEFAULT_FP8_TUNING, rowsum_mma=True), edges)
        additions = attend_sm90_fp8(*operands, *args, replace(DEFAULT_FP8_TUNING, rowsum_mma=False), edges)
        in_place = attend_sm90_fp8(*operands, *args, replace(DEFAULT_FP8_TUNING, rowsum_mma=True), edges,
                                   out_geom=g)
    assert not got.isnan().any()
    assert rel_err(got, additions) < 1e-2  # bf16 output rounding (2e-3) and the sums' FP8 rounding
    torch.testing.assert_close(in_place, unpermute_tiles(got, g), atol=0, rtol=0)
    assert rel_err(unpermute_tiles(got, g).cpu(), masked_reference(q, k, v, g, kv_idx, kv_cnt, keep)) < FP8_BUDGET


@pytest.mark.gpu
def test_sm90_fp8_nan_propagates_as_dense():
    _require_sm90()
    g = Geometry((2, 16, 32), (8, 16), 20, "end")
    kv_idx, kv_cnt = dense_indices(1, 2, g.n_tiles, "cuda")
    for which in range(3):
        qkv = list(_inputs(g, 1, 2, 128, "cuda", torch.bfloat16))
        qkv[which][0, 1, 100, 7] = float("nan")
        dense = torch.nn.functional.scaled_dot_product_attention(*qkv)
        got = tiled_attention(*qkv, kv_idx, kv_cnt, g, precision="fp8")
        torch.testing.assert_close(got.isnan(), dense.isnan(), atol=0, rtol=0)


@pytest.mark.gpu
def test_sm90_fp8_under_inductor_and_cuda_graphs():
    """The FP8 path inside a compiled function (Inductor), replayed under CUDA graphs: no host sync."""
    _require_sm90()
    g = Geometry((2, 16, 32), (8, 16), 77, "end")
    q, k, v = _inputs(g, 1, 2, 128, "cuda", torch.bfloat16)
    fn = torch.compile(lambda q, k, v: draft_attention(q, k, v, g.grid, text_len=77, sparsity=0.5,
                                                       precision="fp8"), mode="reduce-overhead", dynamic=False)
    for _ in range(3):
        got = fn(q, k, v)
    want = draft_attention(q, k, v, g.grid, text_len=77, sparsity=0.5, precision="fp8")
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_fp8_shortfall_is_told():
    """optimize (and the diffusers backend) warn when precision='fp8' was asked for and a rewritten site runs in
    its dtype; sites that run FP8, skipped sites and precision=None say nothing."""
    from draftopt import backend
    from draftopt.passes import SiteRecord
    from draftopt.report import GraphRecord

    why = "not an sm_90 GPU; fp8 needs the sm_90 kernel, so it computes in bfloat16"
    plain = SiteRecord("blocks.0.attn1", "sdpa", "rewritten", kernel="triton", precision="bfloat16", kernel_reason=why)
    fp8 = SiteRecord("blocks.1.attn1", "sdpa", "rewritten", kernel="gluon_sm90", precision="fp8 e4m3")
    skipped = SiteRecord("blocks.0.attn2", "sdpa", reason="cross-attention", dtype="bfloat16")
    assert backend.precision_shortfall([fp8, skipped], "fp8") == ""
    assert backend.precision_shortfall([plain, fp8], None) == ""
    told = backend.precision_shortfall([plain, fp8, skipped], "fp8")
    assert "1 rewritten site(s) compute in bfloat16" in told and why in told
    with pytest.warns(draftopt.DraftoptWarning, match="graph 7: precision='fp8' was asked for"):
        backend._tell_precision(GraphRecord(index=7, sites=[plain, fp8]), "fp8")
