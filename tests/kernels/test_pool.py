import pytest
import torch
from torch.library import opcheck

from draftopt.kernels import Geometry, tile_pool
from draftopt.kernels.ops.pool import tile_pool_reference
from draftopt.kernels.triton.pool import tile_pool_triton

from ..helpers import poison_outputs
from . import reference as ref
from .tolerances import DTYPES, assert_close

CASES = [  # grid, tile, text_len, text_position
    ((3, 13, 27), (8, 16), 0, "end"),
    ((3, 13, 27), (8, 16), 7, "start"),
    ((1, 8, 16), (8, 16), 77, "end"),
    ((2, 5, 9), (4, 4), 256, "start"),
    ((2, 5, 9), (4, 4), 19 + 33, 19),  # text on both sides
]


@pytest.mark.parametrize("grid, tile, text_len, pos", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_tile_pool_op_matches_float64_reference(device, grid, tile, text_len, pos, dtype):
    g = Geometry(grid, tile, text_len, pos)
    x = torch.randn(2, 3, g.seq_len, 64, device=device).to(dtype)
    with poison_outputs():
        out = tile_pool(x, g)
    assert out.shape == (2, 3, g.n_tiles, 64) and out.dtype == torch.float32
    # pooling is an fp32 mean of dtype inputs: compare at fp32 tolerance
    assert_close(out, ref.pool(x.cpu(), grid, tile, text_len, pos), torch.float32)


@pytest.mark.parametrize("grid, tile, text_len, pos, D", [
    ((2, 5, 9), (4, 4), 3, "start", 32),
    ((1, 7, 6), (2, 8), 0, "end", 96),
])
def test_tile_pool_triton_kernel(device, grid, tile, text_len, pos, D):
    """The Triton kernel itself (interpreted on CPU), non-contiguous [B, L, H, D] input."""
    g = Geometry(grid, tile, text_len, pos)
    x = torch.randn(2, g.seq_len, 3, D, device=device).transpose(1, 2)
    with poison_outputs():
        out = tile_pool_triton(x, g)
    assert_close(out, ref.pool(x.cpu(), grid, tile, text_len, pos), torch.float32)
    assert_close(tile_pool_reference(x, g), ref.pool(x.cpu(), grid, tile, text_len, pos), torch.float32)


def test_tile_pool_opcheck(device):
    g = Geometry((2, 5, 9), (4, 4), 3, "start")
    x = torch.randn(1, 2, g.seq_len, 16, device=device)
    opcheck(torch.ops.draftopt.tile_pool.default, (x, *g.op_args()))


def test_tile_pool_rejects_wrong_length(device):
    g = Geometry((2, 4, 4), (4, 4))
    with pytest.raises(ValueError, match="length 33"):
        tile_pool(torch.randn(1, 1, 33, 16, device=device), g)


def test_tile_pool_refuses_grad(device):
    g = Geometry((1, 4, 4), (4, 4))
    x = torch.randn(1, 1, 16, 16, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference-only"):
        tile_pool(x, g)
    with pytest.raises(RuntimeError, match="inference-only"):  # the raw op: at backward
        torch.ops.draftopt.tile_pool(x, *g.op_args()).sum().backward()
