import pytest
import torch
from torch.library import opcheck

from draftopt.kernels import Geometry, permute_tiles, unpermute_tiles
from draftopt.kernels.geometry import permuted_source_index
from draftopt.kernels.ops.permute import gather_rows_reference
from draftopt.kernels.triton.gather import gather_rows_triton

from ..helpers import poison_outputs
from . import reference as ref

GEOMETRIES = [
    Geometry((3, 13, 27), (8, 16), 7, "start"),
    Geometry((1, 8, 16), (8, 16), 0, "end"),
    Geometry((2, 5, 9), (4, 4), 77, "end"),
    Geometry((2, 5, 9), (4, 4), 19 + 33, 19),  # text on both sides
]


@pytest.mark.parametrize("g", GEOMETRIES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_is_identity(device, g, dtype):
    x = torch.randn(2, 3, g.seq_len, 64, device=device).to(dtype)
    with poison_outputs():
        xp = permute_tiles(x, g, pad_value=-7.0)
        back = unpermute_tiles(xp, g)
    assert xp.shape == (2, 3, g.padded_len, 64)
    assert torch.equal(back, x)


@pytest.mark.parametrize("g", GEOMETRIES, ids=str)
def test_each_block_holds_one_tile_and_padding(device, g):
    x = torch.randn(1, 2, g.seq_len, 16, device=device)
    xp = permute_tiles(x, g, pad_value=-7.0).cpu()
    ids = ref.tile_of_tokens(g.grid, g.tile, g.text_len, g.text_position)
    text = (ids == -1).nonzero().flatten()
    first_vis = int((ids >= 0).nonzero()[0])
    # text blocks hold the text in order, block by block: first the text before the grid, then (from a
    # fresh block) the text after it
    text_blocks = [side.split(g.block) for side in (text[text < first_vis], text[text > first_vis])]
    text_blocks = [blk for side in text_blocks for blk in side if blk.numel()]
    assert len(text_blocks) == g.n_text_blocks
    for b in range(g.n_blocks):
        tokens = (ids == b).nonzero().flatten() if b < g.n_tiles else text_blocks[b - g.n_tiles]
        rows = xp[:, :, b * g.block:(b + 1) * g.block]
        n = tokens.numel()
        # the block holds exactly its tokens (as a set: test_geometry checks the in-tile order),
        # every other row is padding
        pad = (rows == -7.0).all(dim=-1)[0, 0]
        assert int((~pad).sum()) == n
        got = rows[:, :, ~pad].reshape(-1, n, 16)
        exp = x.cpu()[:, :, tokens].reshape(-1, n, 16)
        assert torch.equal(got.sort(dim=1).values, exp.sort(dim=1).values)


@pytest.mark.parametrize("D", [16, 96])
def test_gather_kernel(device, D):
    g = Geometry((2, 5, 9), (4, 4), 33, "start")
    x = torch.randn(2, g.seq_len, 3, D, device=device).transpose(1, 2)  # strided input
    src = permuted_source_index(g, device)
    with poison_outputs():
        out = gather_rows_triton(x, src, float("-inf"))
    want = torch.where((src >= 0)[:, None], x[:, :, src.clamp(min=0)], float("-inf"))
    assert torch.equal(out, want)
    assert torch.equal(gather_rows_reference(x, src, float("-inf")), want)


def test_gather_kernel_writes_into_a_given_output(device):
    """``out=``: rows written in place into a strided [B, heads, rows, D] view (the unpermute of the
    fused Hopper path writes into an output laid out like q)."""
    g = Geometry((1, 5, 9), (4, 4), 3, "end")
    x = torch.randn(1, 2, g.padded_len, 32, device=device)
    idx = permuted_source_index(g, device).clamp(min=0)[: g.seq_len]
    with poison_outputs():
        out = torch.empty(1, g.seq_len, 2, 32, device=device).transpose(1, 2)
        got = gather_rows_triton(x, idx, out=out)
    assert got is out
    assert torch.equal(out, gather_rows_reference(x, idx))


def test_permute_opcheck(device):
    g = Geometry((2, 5, 9), (4, 4), 3, "end")
    x = torch.randn(1, 2, g.seq_len, 16, device=device)
    opcheck(torch.ops.draftopt.permute_tiles.default, (x, *g.op_args(), 0.0))
    xp = torch.randn(1, 2, g.padded_len, 16, device=device)
    opcheck(torch.ops.draftopt.unpermute_tiles.default, (xp, *g.op_args()))


def test_shape_errors(device):
    g = Geometry((2, 4, 4), (4, 4))
    with pytest.raises(ValueError, match="33 tokens"):
        permute_tiles(torch.randn(1, 1, 33, 16, device=device), g)
    with pytest.raises(ValueError, match=r"\[B, heads, L, D\]"):
        permute_tiles(torch.randn(32, 16, device=device), g)
