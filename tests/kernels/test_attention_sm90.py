"""The Gluon (Hopper) attention kernel (kernels/gluon/) against the float64 reference, and the
predicates that route a call to it (checked on the CPU with a stand-in device capability)."""

import pytest
import torch

from draftopt.kernels import Geometry, dispatch, permute_tiles, unpermute_tiles
from draftopt.kernels.gluon import _sm90_kernel
from draftopt.kernels.gluon.attention import (Sm90Tuning, _n_sm, _tma_ready, attend_sm90, attend_sm90_in_place,
                                             edge_grid, reads_in_place)
from draftopt.kernels.ops.attention_sm90 import _edges

from ..helpers import key_bias_for, masked_reference, poison_outputs, random_block_mask, without_visual_bias
from .tolerances import assert_close


def _require_sm90():
    if not (torch.cuda.is_available() and _sm90_kernel.HAVE_GLUON
            and torch.cuda.get_device_capability() == (9, 0)):
        pytest.skip("needs an sm_90 GPU and Triton's Gluon")


@pytest.mark.gpu
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
                                               g.n_text_blocks, visual_bias, [])
    assert_close(unpermute_tiles(out_p, g), masked_reference(q, k, v, g, kv_idx, kv_cnt, key_keep), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("tuning", [Sm90Tuning(2, 2, pingpong=False), Sm90Tuning(3, 2, pingpong=False),
                                    Sm90Tuning(2, 3, pingpong=True), Sm90Tuning(3, 2, pingpong=True)], ids=str)
def test_sm90_schedules(tuning):
    """Other K / V ring sizes and the ping-pong schedule (the sweep's alternatives) compute the same."""
    _require_sm90()
    g = Geometry((2, 16, 32), (8, 16), 77, "end")
    q, k, v = (torch.randn(1, 2, g.padded_len, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    kv_idx, kv_cnt = random_block_mask(1, 2, g.n_tiles, 0.5, "cuda")
    bias = key_bias_for(g, torch.ones(1, g.seq_len, dtype=torch.bool, device="cuda"), "cuda")
    want = attend_sm90(q, k, v, kv_idx, kv_cnt, bias, 0.1, g.n_tiles, g.n_text_blocks, True)
    got = attend_sm90(q, k, v, kv_idx, kv_cnt, bias, 0.1, g.n_tiles, g.n_text_blocks, True, tuning=tuning)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("pingpong", [True, False])
@pytest.mark.parametrize("g", [Geometry((2, 16, 32), (8, 16), 77, "end"), Geometry((3, 13, 37), (8, 16), 40, "start")],
                         ids=["exact", "padded"])
def test_sm90_rowsum_mma_matches_float64(g, pingpong):
    """Sm90Tuning(rowsum_mma=True): P's row sums as a product P @ ones beside P V (sums of the rounded P
    the numerator uses) instead of additions, in place and tile-major (batch 2), against float64; a NaN in
    q still reaches only its row."""
    _require_sm90()
    tuning = Sm90Tuning(pingpong=pingpong, rowsum_mma=True)
    H, D, dtype = 2, 128, torch.bfloat16
    for B in (1, 2):
        q, k, v = (torch.randn(B, H, g.seq_len, D, device="cuda").to(dtype) for _ in range(3))
        kv_idx, kv_cnt = random_block_mask(B, H, g.n_tiles, 0.4, "cuda")
        keep = torch.ones(B, g.seq_len, dtype=torch.bool, device="cuda")
        keep[:, g.text_offset: g.text_offset + 9] = False  # a mask on text keys only
        bias = key_bias_for(g, keep, "cuda")
        want = masked_reference(q, k, v, g, kv_idx, kv_cnt, keep)
        with poison_outputs():
            if B == 1:
                out = attend_sm90_in_place(q, k, v, kv_idx, kv_cnt, bias, D ** -0.5, g, False, tuning)
            else:
                qp, kp, vp = (permute_tiles(t, g) for t in (q, k, v))
                edges = None if not g.has_visual_padding else (*g.grid[1:], *g.tile)
                out = unpermute_tiles(attend_sm90(qp, kp, vp, kv_idx, kv_cnt, bias, D ** -0.5, g.n_tiles,
                                                  g.n_text_blocks, False, tuning, edges), g)
        assert_close(out, want, dtype)
    q[0, 1, 100, 3] = float("nan")
    out = attend_sm90_in_place(q[:1], k[:1], v[:1], kv_idx[:1], kv_cnt[:1], bias[:1], D ** -0.5, g, False, tuning)
    assert out[0, 1, 100].isnan().all() and not out[0, 1, :100].isnan().any()


@pytest.mark.gpu
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
    assert 2 * 3 * (g.n_tiles + g.n_text_blocks) > _n_sm(torch.cuda.current_device())
    qp, kp, vp = (permute_tiles(t, g) for t in (q, k, v))
    with poison_outputs():
        got = attend_sm90(qp, kp, vp, kv_idx, kv_cnt, bias, 128 ** -0.5, g.n_tiles, g.n_text_blocks, False,
                          tuning=Sm90Tuning(rotate=rotate))
    assert_close(unpermute_tiles(got, g), masked_reference(q, k, v, g, kv_idx, kv_cnt, keep), torch.bfloat16)


MISFITS = [  # (dtype, head dim, block) the Gluon kernel does not take, and the reason given
    (torch.float32, 128, 128, "dtype float32 (the sm_90 kernel takes bfloat16, float16)"),
    (torch.bfloat16, 96, 128, "head dim 96 (the sm_90 kernel takes (64, 128))"),
    (torch.float16, 128, 64, "64-token tiles (the sm_90 kernel takes 128)"),
]


@pytest.fixture
def fake_sm90(monkeypatch):
    """Pretend cuda:0 is an sm_90 GPU: the predicates read only its capability."""
    monkeypatch.setattr(dispatch, "_capability", lambda index: (9, 0))
    return torch.device("cuda", 0)


@pytest.mark.parametrize("dtype, D, block, reason", MISFITS)
def test_sm90_misfit_names_what_does_not_fit(fake_sm90, dtype, D, block, reason):
    """float32, other head dims and other block sizes stay on the Triton kernel, with the reason."""
    assert dispatch.sm90_misfit(block, dtype, fake_sm90, D) == reason


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
def test_sm90_misfit_accepts_what_the_kernel_takes(fake_sm90, dtype, D):
    assert dispatch.sm90_misfit(128, dtype, fake_sm90, D) is None


@pytest.mark.parametrize("capability", [(8, 0), (8, 9), (9, 0), (10, 0), (12, 0)])
def test_sm90_misfit_needs_exactly_sm90(monkeypatch, capability):
    monkeypatch.setattr(dispatch, "_capability", lambda index: capability)
    misfit = dispatch.sm90_misfit(128, torch.bfloat16, torch.device("cuda", 0), 128)
    assert (misfit is None) == (capability == (9, 0))
    assert misfit in (None, "not an sm_90 GPU")


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_sm90_misfit_off_cuda(device):
    assert dispatch.sm90_misfit(128, torch.bfloat16, torch.device(device), 128) == "not an sm_90 GPU"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, D, block, reason", MISFITS)
def test_sm90_misfit_on_this_gpu(dtype, D, block, reason):
    _require_sm90()
    assert dispatch.sm90_misfit(block, dtype, torch.device("cuda"), D) == reason
    assert dispatch.sm90_misfit(128, torch.bfloat16, torch.device("cuda"), 128) is None


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
@pytest.mark.parametrize("g, H, D, visual_bias", [
    (Geometry((2, 16, 32), (8, 16), 77, "end"), 3, 128, False),
    (Geometry((3, 12, 20), (8, 16), 0, "end"), 2, 64, True),        # edge tiles: boxes clipped by the TMA unit
    (Geometry((2, 24, 40), (8, 16), 300, "start"), 2, 128, True),   # text first, 3 text blocks, padded grid
    (Geometry((1, 32, 64), (4, 32), 0, "end"), 1, 128, False),      # another tile shape
    (Geometry((3, 13, 40), (8, 16), 0, "end"), 2, 128, False),      # padded rows masked by position
    (Geometry((2, 13, 37), (4, 32), 77, "end"), 2, 64, False),      # padded rows and columns, by position
    (Geometry((2, 1, 13 * 37), (1, 128), 77, "end"), 2, 128, False),  # raster strips, padded frame ends
    (Geometry((2, 1, 512), (1, 128), 0, "end"), 1, 64, False),      # strips covering each frame exactly
], ids=["text-end", "padded-d64", "text-start", "tile4x32", "edge-rows", "edge-rows-cols", "strips", "strips-exact"])
def test_sm90_in_place_matches_float64(g, H, D, visual_bias, layout):
    """Stages 3-5 in one kernel: tiles read and written where they lie (batch 1), any strides SDPA uses.
    ``visual_bias`` True: a key mask hides visual keys too (the bias masks edge tiles' padding); False: only
    text keys are masked by the bias, and edge tiles' padding keys by their position in the tile."""
    _require_sm90()
    dtype = torch.bfloat16
    q, k, v = (torch.randn(1, H, g.seq_len, D, device="cuda").to(dtype) for _ in range(3))
    if layout == "blhd":  # SDPA's usual input: a transposed view of [B, L, heads, D]
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert reads_in_place(g, 1)
    kv_idx, kv_cnt = random_block_mask(1, H, g.n_tiles, 0.4, "cuda")
    key_keep = torch.ones(1, g.seq_len, dtype=torch.bool, device="cuda")
    if g.text_len > 1:
        key_keep[0, g.text_offset + g.text_len // 2: g.text_offset + g.text_len] = False
    if visual_bias:  # the mask hides some real visual keys as well
        key_keep[0, g.visual_offset + 5: g.visual_offset + g.n_visual: 7] = False
    bias = key_bias_for(g, key_keep, "cuda")
    with poison_outputs():
        out = torch.ops.draftopt.attend_sm90_in_place(q, k, v, kv_idx, kv_cnt, bias, D ** -0.5, *g.op_args(),
                                                      visual_bias)
    assert out.stride() == q.stride()
    assert_close(out, masked_reference(q, k, v, g, kv_idx, kv_cnt, key_keep), dtype)


@pytest.mark.parametrize("tile, batch, in_place", [
    ((8, 16), 1, True), ((4, 32), 1, True), ((2, 64), 1, True),
    ((8, 16), 2, False),  # batch > 1 cannot be one TMA box view: the permuted-copy path takes it
    ((1, 128), 1, True),  # a one-row tile (a raster strip) splits in two column halves
    ((16, 4), 1, False),  # rows of 4 tokens: not whole 16-byte rows
])
def test_reads_in_place(tile, batch, in_place):
    assert reads_in_place(Geometry((2, 16, 128), tile), batch) is in_place


@pytest.mark.parametrize("g, visual_bias, want", [
    (Geometry((2, 13, 37), (4, 32), 77, "end"), False, (13, 37, 4, 32)),  # padded, no key mask: by position
    (Geometry((2, 13, 37), (4, 32), 77, "end"), True, None),             # a key mask: the bias carries it
    (Geometry((2, 16, 32), (8, 16), 77, "end"), False, None),            # tiles cover the grid: nothing to mask
])
def test_edge_grid(g, visual_bias, want):
    assert edge_grid(g, visual_bias) == want


def test_tile_major_ops_take_edges_and_refuse_a_bad_one():
    """The tile-major ops' fake impls (what torch.compile traces) take ``edges``; a malformed one is refused."""
    g = Geometry((2, 13, 37), (4, 32), 77, "end")
    q = torch.empty(1, 2, g.padded_len, 128, device="meta", dtype=torch.bfloat16)
    kv_idx = torch.empty(1, 2, g.n_tiles, g.n_tiles, device="meta", dtype=torch.int32)
    kv_cnt = torch.empty(1, 2, g.n_tiles, device="meta", dtype=torch.int32)
    bias = torch.empty(1, 1, g.padded_len, device="meta")
    args = (q, q, q, kv_idx, kv_cnt, bias, 0.1, g.n_tiles, g.n_text_blocks, False)
    assert torch.ops.draftopt.attend_sm90(*args, [13, 37, 4, 32]).shape == q.shape
    q8 = q.to(torch.float8_e4m3fn)
    scales = (torch.empty(1, 2, g.n_blocks, device="meta"), torch.empty(1, 2, device="meta"),
              torch.empty(1, 2, device="meta"))
    out = torch.ops.draftopt.attend_sm90_fp8(q8, q8, q8.transpose(2, 3), *scales, *args[3:], torch.bfloat16, [])
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"edges must be \[\] or \[H, W, tile_h, tile_w\], got \[13, 37\]"):
        _edges([13, 37])


def test_text_on_both_sides_is_not_read_in_place():
    """One row descriptor addresses the text: with text before and after the grid (FramePack) the Gluon
    kernel runs on permuted copies, and the in-place op refuses such a geometry."""
    g = Geometry((2, 16, 128), (8, 16), 300 + 77, 300)
    assert not reads_in_place(g, 1)
    with pytest.raises(ValueError, match="cannot address this geometry in place"):
        attend_sm90_in_place(*(torch.zeros(1, 1, g.seq_len, 128),) * 3, None, None, None, 0.1, g, True)


@pytest.mark.gpu
@pytest.mark.parametrize("visual_bias", [True, False])
@pytest.mark.parametrize("B", [1, 2])
def test_sm90_tiled_with_text_on_both_sides_matches_float64(B, visual_bias):
    """History before the grid and text after it, through draftopt::tiled_attention on the Gluon kernel
    (permuted inside the op), a key padding mask on the text after the grid. The grid's columns are padded;
    ``visual_bias`` False: the op masks that padding by position on the copies (the bias given is 0 on
    every visual key)."""
    _require_sm90()
    g = Geometry((2, 24, 40), (8, 16), 300 + 77, 300)
    H, D, dtype = 2, 128, torch.bfloat16
    q, k, v = (torch.randn(B, H, g.seq_len, D, device="cuda").to(dtype) for _ in range(3))
    kv_idx, kv_cnt = random_block_mask(B, H, g.n_tiles, 0.4, "cuda")
    key_keep = torch.ones(B, g.seq_len, dtype=torch.bool, device="cuda")
    key_keep[:, g.suffix_offset + 40:] = False
    bias = key_bias_for(g, key_keep, "cuda")
    if not visual_bias:
        bias = without_visual_bias(bias, g)
    with poison_outputs():
        out = torch.ops.draftopt.tiled_attention(q, k, v, kv_idx, kv_cnt, bias, D ** -0.5, *g.op_args(),
                                                 visual_bias, "gluon_sm90")
    assert_close(out, masked_reference(q, k, v, g, kv_idx, kv_cnt, key_keep), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("g", [Geometry((3, 12, 20), (8, 16), 0, "end"), Geometry((2, 13, 37), (4, 32), 77, "end")],
                         ids=["rows-cols", "tile4x32"])
def test_sm90_tile_major_masks_edges_by_position(g):
    """The tile-major op with ``edges``: edge tiles' padding keys masked by their position in the tile (the
    bias is 0 on every visual key), against float64; without ``edges`` that padding would be attended."""
    _require_sm90()
    B, H, D, dtype = 2, 2, 128, torch.bfloat16
    q, k, v = (torch.randn(B, H, g.seq_len, D, device="cuda").to(dtype) for _ in range(3))
    kv_idx, kv_cnt = random_block_mask(B, H, g.n_tiles, 0.5, "cuda")
    keep = torch.ones(B, g.seq_len, dtype=torch.bool, device="cuda")
    bias = without_visual_bias(key_bias_for(g, keep, "cuda"), g)
    qp, kp, vp = (permute_tiles(t, g) for t in (q, k, v))
    want = masked_reference(q, k, v, g, kv_idx, kv_cnt, keep)
    edges = [*g.grid[1:], *g.tile]
    with poison_outputs():
        out = torch.ops.draftopt.attend_sm90(qp, kp, vp, kv_idx, kv_cnt, bias, D ** -0.5, g.n_tiles,
                                             g.n_text_blocks, False, edges)
    assert_close(unpermute_tiles(out, g), want, dtype)
    unmasked = torch.ops.draftopt.attend_sm90(qp, kp, vp, kv_idx, kv_cnt, bias, D ** -0.5, g.n_tiles,
                                              g.n_text_blocks, False, [])
    assert (unpermute_tiles(unmasked, g).float().cpu() - want.float()).abs().max() > 1e-2


def test_tma_ready_copies_what_the_copy_engine_cannot_read():
    """The in-place launcher reads q, k, v where they lie when TMA can (unit inner stride, 16-byte aligned
    strides and start), else a contiguous copy: an odd storage offset, an inner stride, odd head dims."""
    q = torch.randn(1, 2, 300, 128, dtype=torch.bfloat16)
    blhd = torch.randn(1, 300, 2, 128, dtype=torch.bfloat16).transpose(1, 2)  # SDPA's usual layout
    assert _tma_ready(q) is q and _tma_ready(blhd) is blhd
    buf = torch.randn(q.numel() + 1, dtype=torch.bfloat16)
    odd = buf[1:].view(q.shape)  # storage offset 1: 2 bytes past an aligned address
    inner = torch.randn(1, 2, 300, 256, dtype=torch.bfloat16)[..., ::2]  # stride 2 along D
    rows = torch.randn(1, 2, 300, 132, dtype=torch.bfloat16)[..., :128]  # token stride 132: not 16-byte aligned
    for t in (odd, inner, rows):
        copy = _tma_ready(t)
        assert copy is not t and copy.is_contiguous() and torch.equal(copy, t)
        assert _tma_ready(copy) is copy


@pytest.mark.gpu
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
    assert _tma_ready(q_odd) is not q_odd  # the launcher reads a copy
    torch.testing.assert_close(fn(q_odd, k, v), want, atol=0, rtol=0)
