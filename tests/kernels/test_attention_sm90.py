"""The Gluon (Hopper) attention kernel (kernels/attention_sm90.py) against the float64 reference."""

import pytest
import torch

from draftopt.kernels import Geometry, permute_tiles, unpermute_tiles
from draftopt.kernels import attention_sm90
from draftopt.kernels._common import poison_outputs

from .test_attention import expected, key_bias_for, random_block_mask
from .tolerances import assert_close

def _require_sm90():
    if not (torch.cuda.is_available() and attention_sm90.HAVE_GLUON
            and torch.cuda.get_device_capability() == (9, 0)):
        pytest.skip("needs an sm_90 GPU and Triton's Gluon")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("g, B, H, D, density, visual_bias", [
    (Geometry((2, 16, 32), (8, 16), 77, "end"), 2, 3, 128, 0.3, False),   # tiles cover the grid: no visual bias
    (Geometry((2, 16, 32), (8, 16), 77, "end"), 1, 2, 128, 0.3, True),
    (Geometry((3, 12, 20), (8, 16), 0, "end"), 1, 2, 64, 0.5, True),      # edge tiles with padding rows
    (Geometry((2, 16, 48), (8, 16), 200, "start"), 1, 2, 128, 0.0, False),  # diagonal only (one block a row)
    (Geometry((1, 32, 64), (8, 16), 0, "end"), 1, 1, 128, 1.0, False),    # every block: rings wrap many times
    (Geometry((3, 24, 33), (8, 16), 130, "end"), 2, 1, 64, 0.2, True),
], ids=["text-end", "text-end-bias", "padded-d64", "diagonal-only", "dense", "odd"])
def test_sm90_matches_float64(g, B, H, D, density, visual_bias, dtype):
    _require_sm90()
    q, k, v = (torch.randn(B, H, g.seq_len, D, device="cuda").to(dtype) for _ in range(3))
    kv_idx, kv_cnt = random_block_mask(B, H, g.n_tiles, density, "cuda")
    key_keep = torch.ones(B, g.seq_len, dtype=torch.bool, device="cuda")
    if g.text_len > 1:  # hide the last text tokens of batch 0
        key_keep[0, g.text_offset + g.text_len // 2: g.text_offset + g.text_len] = False
    bias = key_bias_for(g, key_keep, "cuda")
    qp, kp, vp = (permute_tiles(t, g) for t in (q, k, v))
    with poison_outputs():
        out_p = torch.ops.draftopt.attend_sm90(qp, kp, vp, kv_idx, kv_cnt, bias, D ** -0.5, g.n_tiles,
                                               g.n_text_blocks, visual_bias)
    assert_close(unpermute_tiles(out_p, g), expected(q, k, v, g, kv_idx, kv_cnt, key_keep), dtype)


@pytest.mark.parametrize("stages", [(2, 2, False), (3, 2, False), (2, 3, True), (3, 2, True)])
def test_sm90_schedules(stages):
    """Other K / V ring sizes and the ping-pong schedule (the sweep's alternatives) compute the same."""
    _require_sm90()
    g = Geometry((2, 16, 32), (8, 16), 77, "end")
    q, k, v = (torch.randn(1, 2, g.padded_len, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    kv_idx, kv_cnt = random_block_mask(1, 2, g.n_tiles, 0.5, "cuda")
    bias = key_bias_for(g, torch.ones(1, g.seq_len, dtype=torch.bool, device="cuda"), "cuda")
    want = attention_sm90.attend_sm90(q, k, v, kv_idx, kv_cnt, bias, 0.1, g.n_tiles, g.n_text_blocks, True)
    got = attention_sm90.attend_sm90(q, k, v, kv_idx, kv_cnt, bias, 0.1, g.n_tiles, g.n_text_blocks, True, *stages)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("rotate", [False, True])
def test_sm90_rotated_sweeps(rotate):
    """Key sweeps started mid-list (ROTATE) and the heavy-first program order, over more programs than SMs
    (so program ids wrap the rotation) and uneven key counts per row, against float64."""
    _require_sm90()
    g = Geometry((5, 16, 48), (8, 16), 150, "start")  # tiles cover the grid: no visual bias needed
    q, k, v = (torch.randn(2, 3, g.seq_len, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    kv_idx, kv_cnt = random_block_mask(2, 3, g.n_tiles, 0.6, "cuda")
    keep = torch.ones(2, g.seq_len, dtype=torch.bool, device="cuda")
    bias = key_bias_for(g, keep, "cuda")
    assert 2 * 3 * (g.n_tiles + g.n_text_blocks) > attention_sm90._n_sm(torch.cuda.current_device())
    qp, kp, vp = (permute_tiles(t, g) for t in (q, k, v))
    with poison_outputs():
        got = attention_sm90.attend_sm90(qp, kp, vp, kv_idx, kv_cnt, bias, 128 ** -0.5, g.n_tiles,
                                         g.n_text_blocks, False, rotate=rotate)
    assert_close(unpermute_tiles(got, g), expected(q, k, v, g, kv_idx, kv_cnt, keep), torch.bfloat16)


@pytest.mark.parametrize("dtype, D, block", [(torch.float32, 128, 128), (torch.bfloat16, 96, 128),
                                             (torch.bfloat16, 128, 64)])
def test_sm90_not_supported(dtype, D, block):
    """float32, other head dims and other block sizes stay on the Triton kernel."""
    q = torch.empty(1, 1, 128, D, dtype=dtype, device="cuda" if torch.cuda.is_available() else "cpu")
    assert not attention_sm90.supported(q, block)


def test_sm90_not_on_cpu():
    assert not attention_sm90.supported(torch.empty(1, 1, 128, 128, dtype=torch.bfloat16), 128)


@pytest.mark.parametrize("layout", ["bhld", "blhd"])
@pytest.mark.parametrize("g, H, D, visual_bias", [
    (Geometry((2, 16, 32), (8, 16), 77, "end"), 3, 128, False),
    (Geometry((3, 12, 20), (8, 16), 0, "end"), 2, 64, True),        # edge tiles: boxes clipped by the TMA unit
    (Geometry((2, 24, 40), (8, 16), 300, "start"), 2, 128, True),   # text first, 3 text blocks, padded grid
    (Geometry((1, 32, 64), (4, 32), 0, "end"), 1, 128, False),      # another tile shape
], ids=["text-end", "padded-d64", "text-start", "tile4x32"])
def test_sm90_in_place_matches_float64(g, H, D, visual_bias, layout):
    """Stages 3-5 in one kernel: tiles read and written where they lie (batch 1), any strides SDPA uses."""
    _require_sm90()
    dtype = torch.bfloat16
    q, k, v = (torch.randn(1, H, g.seq_len, D, device="cuda").to(dtype) for _ in range(3))
    if layout == "blhd":  # SDPA's usual input: a transposed view of [B, L, heads, D]
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert attention_sm90.in_place_supported(q, k, v, g)
    kv_idx, kv_cnt = random_block_mask(1, H, g.n_tiles, 0.4, "cuda")
    key_keep = torch.ones(1, g.seq_len, dtype=torch.bool, device="cuda")
    if g.text_len > 1:
        key_keep[0, g.text_offset + g.text_len // 2: g.text_offset + g.text_len] = False
    bias = key_bias_for(g, key_keep, "cuda")
    with poison_outputs():
        out = torch.ops.draftopt.attend_sm90_in_place(q, k, v, kv_idx, kv_cnt, bias, D ** -0.5, *g.op_args(),
                                                      visual_bias)
    assert out.stride() == q.stride()
    assert_close(out, expected(q, k, v, g, kv_idx, kv_cnt, key_keep), dtype)


def test_sm90_in_place_refuses_batches():
    """Batch > 1 cannot be one TMA box view: the permuted-copy path takes it."""
    g = Geometry((2, 16, 32), (8, 16), 0, "end")
    q = torch.empty(2, 2, g.seq_len, 128, dtype=torch.bfloat16, device="cuda" if torch.cuda.is_available() else "cpu")
    assert not attention_sm90.in_place_supported(q, q, q, g)


def test_sm90_in_place_under_inductor():
    """torch.compile traces tiled_attention with fake tensors (no data pointers) and still picks the in-place
    op at batch 1; the compiled result equals the eager one. A view at an odd offset takes the copy path."""
    _require_sm90()
    from draftopt.kernels import tiled_attention

    g = Geometry((2, 24, 40), (8, 16), 300, "start")
    q, k, v = (torch.randn(1, 2, g.seq_len, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    kv_idx, kv_cnt = random_block_mask(1, 2, g.n_tiles, 0.4, "cuda")
    fn = lambda q, k, v: tiled_attention(q, k, v, kv_idx, kv_cnt, g)  # noqa: E731
    want = fn(q, k, v)
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(q, k, v), want, atol=0, rtol=0)
    buf = torch.randn(q.numel() + 1, device="cuda", dtype=torch.bfloat16)
    q_odd = buf[1:].view(q.shape).copy_(q)  # storage offset 1: not 16-byte aligned
    assert not attention_sm90.in_place_supported(q_odd, k, v, g)
    torch.testing.assert_close(fn(q_odd, k, v), want, atol=0, rtol=0)
