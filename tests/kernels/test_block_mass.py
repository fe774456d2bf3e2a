"""Policy "mass": tile moments (stage 1) and the estimated block mass (stage 2a) against float64 references."""

import pytest
import torch
from torch.library import opcheck

from draftopt.kernels import Geometry, block_mass, draft_attention, tile_moments
from draftopt.kernels.ops.block_mass import block_mass_reference
from draftopt.kernels.sparsity import keep_percentile
from draftopt.kernels.triton.pool import tile_moments_triton

from ..helpers import poison_outputs
from . import reference as ref
from .tolerances import DTYPES, assert_close

CASES = [  # grid, tile, text_len, text_position: partial tiles at the right / bottom edges included
    ((3, 13, 27), (8, 16), 0, "end"),
    ((2, 12, 20), (8, 16), 7, "start"),
    ((2, 5, 9), (4, 4), 33, "end"),
]


def moments64(x, grid, tile, text_len, pos):
    """Per tile: the mean over its tokens, and the mean over tokens and dims of (x - mean)^2."""
    ids = ref.tile_of_tokens(grid, tile, text_len, pos)
    S = int(ids.max()) + 1
    x = x.double().cpu()
    means = torch.stack([x[:, :, ids == s].mean(dim=2) for s in range(S)], dim=2)
    spreads = torch.stack([(x[:, :, ids == s] - means[:, :, s, None]).pow(2).mean(dim=(2, 3)) for s in range(S)],
                          dim=2)
    return means, spreads


def mass64(qm, qv, km, kv, counts, scale):
    """The module doc's formula written out pair by pair's terms (no feature trick)."""
    D = qm.shape[-1]
    z = scale * qm @ km.transpose(-1, -2)
    z = z + 0.5 * scale ** 2 * (qv[..., :, None] * km.pow(2).sum(-1)[..., None, :]
                                + qm.pow(2).sum(-1)[..., :, None] * kv[..., None, :]
                                + D * qv[..., :, None] * kv[..., None, :])
    z = z + counts.log()
    return torch.softmax(z, dim=-1) * counts[:, None]


@pytest.mark.parametrize("grid, tile, text_len, pos", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_tile_moments_match_float64(device, grid, tile, text_len, pos, dtype):
    g = Geometry(grid, tile, text_len, pos)
    x = (torch.randn(2, 3, g.seq_len, 64, device=device) * 2 + 0.5).to(dtype)
    with poison_outputs():
        mean, spread = tile_moments(x, g)
    want_mean, want_spread = moments64(x, grid, tile, text_len, pos)
    assert mean.dtype == spread.dtype == torch.float32 and spread.shape == (2, 3, g.n_tiles)
    assert_close(mean, want_mean, torch.float32)
    torch.testing.assert_close(spread.double().cpu(), want_spread, atol=1e-4, rtol=1e-4)


def test_tile_moments_triton_kernel_non_contiguous(device):
    """The Triton kernel itself (interpreted on CPU) on SDPA's usual [B, L, heads, D] view, D not a power of 2."""
    grid, tile = (2, 5, 9), (4, 4)
    g = Geometry(grid, tile, 3, "start")
    x = torch.randn(2, g.seq_len, 3, 48, device=device).transpose(1, 2)
    with poison_outputs():
        mean, spread = tile_moments_triton(x, g)
    want_mean, want_spread = moments64(x, grid, tile, 3, "start")
    assert_close(mean, want_mean, torch.float32)
    torch.testing.assert_close(spread.double().cpu(), want_spread, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("grid, tile, text_len, pos", CASES)
def test_block_mass_matches_its_formula(device, grid, tile, text_len, pos):
    g = Geometry(grid, tile, text_len, pos)
    q, k = (torch.randn(1, 2, g.seq_len, 64, device=device) for _ in range(2))
    qm, qv = tile_moments(q, g)
    km, kv = tile_moments(k, g)
    with poison_outputs():
        M = block_mass(qm, qv, km, kv, g, 0.125)
    counts = torch.tensor([float((ref.tile_of_tokens(grid, tile, text_len, pos) == s).sum())
                           for s in range(g.n_tiles)], dtype=torch.float64)
    want = mass64(*(t.double().cpu() for t in (qm, qv, km, kv)), counts, 0.125)
    # the GPU's draft map kernel multiplies in tf32: a relative 1e-3 on logits of order 1
    tol = 1e-5 if device == "cpu" else 5e-3
    torch.testing.assert_close(M.double().cpu(), want, atol=tol * 16, rtol=tol)
    torch.testing.assert_close(M.sum(-1).double().cpu(), counts.expand(1, 2, -1), atol=1e-3, rtol=1e-4)


def test_block_mass_is_the_true_mass_when_tiles_are_uniform(device):
    """With every token of a tile equal to the tile's vector (spread 0) the estimate is exact: the mass
    that dense attention puts on each (query tile, key tile) pair, partial tiles included."""
    grid, tile = (2, 12, 20), (8, 16)
    g = Geometry(grid, tile)
    ids = ref.tile_of_tokens(grid, tile, 0, "end")
    per_tile = [torch.randn(1, 2, g.n_tiles, 32, device=device) for _ in range(2)]
    q, k = (t[:, :, ids.to(device)] for t in per_tile)
    M = block_mass(*tile_moments(q, g), *tile_moments(k, g), g, 32 ** -0.5)
    p = torch.softmax(q.double().cpu() @ k.double().cpu().transpose(-1, -2) * 32 ** -0.5, dim=-1)
    onehot = torch.nn.functional.one_hot(ids, g.n_tiles).double()
    true_mass = onehot.T @ p @ onehot
    tol = 1e-5 if device == "cpu" else 5e-3
    torch.testing.assert_close(M.double().cpu(), true_mass, atol=tol * 16, rtol=tol)


def test_mass_policy_ranks_the_block_mass(device):
    """draft_attention(policy="mass") keeps each head's top pairs of block_mass (the percentile rule on M)."""
    g = Geometry((2, 20, 36), (8, 16), 5, "end")
    q, k, v = (torch.randn(2, 2, g.seq_len, 64, device=device) for _ in range(3))
    _, mask = draft_attention(q, k, v, g.grid, text_len=5, sparsity=0.7, policy="mass", return_mask=True)
    M = block_mass_reference(*tile_moments(q, g), *tile_moments(k, g), g, 0.125)
    assert mask.policy == "mass"
    torch.testing.assert_close(mask.draft_map, M, atol=0.05, rtol=5e-3)  # the map kept is block_mass's
    assert torch.equal(mask.to_dense().cpu(), keep_percentile(mask.draft_map, 0.7).cpu())


def test_block_mass_and_moments_opcheck(device):
    g = Geometry((2, 5, 9), (4, 4), 3, "start")
    x = torch.randn(1, 2, g.seq_len, 16, device=device)
    opcheck(torch.ops.draftopt.tile_moments.default, (x, *g.op_args()))
    m, v = tile_moments(x, g)
    opcheck(torch.ops.draftopt.block_mass.default, (m, v, m, v, *g.op_args(), 0.25))


def test_block_mass_shape_errors(device):
    g = Geometry((2, 5, 9), (4, 4))
    m, v = tile_moments(torch.randn(1, 2, g.seq_len, 16, device=device), g)
    with pytest.raises(ValueError, match="tile means"):
        block_mass(m[:, :, :3], v, m, v, g, 0.25)
    with pytest.raises(ValueError, match="spreads"):
        block_mass(m, v[..., None], m, v, g, 0.25)


@pytest.mark.gpu
def test_mass_policy_captures_in_a_cuda_graph():
    """Stages 1-2 of policy "mass" (moments, block mass, radix select) never wait for the host: they capture
    in a CUDA graph, and replays on new inputs select what an eager call selects."""
    g = Geometry((3, 24, 40), (8, 16), 11, "end")
    q, k = (torch.randn(1, 4, g.seq_len, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))

    def select():
        from draftopt.kernels import score_map, select_blocks
        return select_blocks(score_map(q, k, g, 128 ** -0.5, "mass"), 0.9, "mass")

    select()  # compile the kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = select()
    for _ in range(2):
        q.copy_(torch.randn_like(q))
        k.copy_(torch.randn_like(k))
        graph.replay()
        want = select()
        assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1])
