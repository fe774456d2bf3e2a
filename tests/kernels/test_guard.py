"""The quality guard and run-time sparsity: sparsity.guarded_keep and draftopt::select_blocks_guarded."""

import pytest
import torch

from draftopt.kernels import DraftBlockMask, Geometry
from draftopt.kernels.control import RuntimeControl
from draftopt.kernels.ops.select import select_blocks_guarded
from draftopt.kernels.sparsity import estimated_error, guarded_keep, keep_count, keep_percentile

from ..helpers import kept, random_map


def guarded64(P, sparsity, max_error):
    """The definition, head by head in float64: the keep_count largest entries, or more where they hold
    less than 1 - max_error of the head's mass: then the fewest largest that hold it; plus the diagonal."""
    B, H, S, _ = P.shape
    keep = torch.zeros(B, H, S * S, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            vals, order = P[b, h].double().flatten().sort(descending=True)
            need = (1 - max_error) * vals.sum()
            n_mass = int((vals.cumsum(0) < need).sum()) + 1  # the fewest whose sum reaches the need
            n = max(keep_count(sparsity, S * S), min(n_mass, S * S))
            keep[b, h, order[:n]] = True
    return keep.reshape(B, H, S, S) | torch.eye(S, dtype=torch.bool)


@pytest.mark.parametrize("S", [7, 40])
@pytest.mark.parametrize("sparsity, max_error", [(0.9, 1.0), (0.9, 0.2), (0.5, 0.05), (0.97, 0.01)])
def test_guarded_keep_matches_its_definition(device, S, sparsity, max_error):
    P = random_map(2, 3, S, device)
    got = guarded_keep(P, sparsity, max_error)
    assert torch.equal(got.cpu(), guarded64(P.cpu(), sparsity, max_error))
    if max_error < 1.0:
        assert (estimated_error(P, got) <= max_error + 1e-6).all()


def test_without_the_guard_it_is_the_percentile_rule(device):
    P = random_map(2, 3, 30, device)
    assert torch.equal(guarded_keep(P, 0.9, 1.0), keep_percentile(P, 0.9))


def test_diffuse_heads_are_widened_and_sharp_heads_are_not(device):
    """Head 0 attends sharply (each tile to one key tile), head 1 diffusely (nearly uniform rows): with
    max_error 0.1 at sparsity 0.9 the diffuse head keeps far more pairs, the sharp head keeps its count."""
    S = 30
    sharp = 1e-4 * torch.rand(S, S, device=device) + torch.eye(S, device=device).roll(3, dims=1)
    diffuse = 1.0 + 0.01 * torch.rand(S, S, device=device)
    P = torch.stack([sharp, diffuse])[None]
    P = P / P.sum(-1, keepdim=True)
    kv_idx, kv_cnt = select_blocks_guarded(P, 0.9, 0.1)
    mask = DraftBlockMask(kv_idx, kv_cnt, Geometry((1, 5 * 8, 6 * 16)), "mass", 0.9, draft_map=P)
    counts = kv_cnt.sum(-1)[0].tolist()
    assert counts[0] <= keep_count(0.9, S * S) + S and counts[1] >= 0.85 * S * S
    assert mask.widened()[0].tolist() == [False, True]
    assert (mask.estimated_error() <= 0.1 + 1e-6).all()


def test_the_op_lists_what_guarded_keep_keeps(device):
    P = random_map(2, 2, 24, device)
    kv_idx, kv_cnt = select_blocks_guarded(P, 0.8, 0.1)
    assert kv_idx.shape == (2, 2, 24, 24)
    assert torch.equal(kept(kv_idx, kv_cnt), guarded_keep(P, 0.8, 0.1).cpu())


def test_run_time_control_changes_the_selection_without_recompiling(device):
    """The op reads its RuntimeControl's device tensor: new values, new selection, the same compiled graph."""
    P = random_map(1, 2, 20, device)
    ctl = RuntimeControl(sparsity=0.9)
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(gm)
        return gm

    fn = torch.compile(lambda p: torch.ops.draftopt.select_blocks_guarded(p, 0.0, 1.0, ctl.key), backend=backend)
    counts = []
    for sparsity, max_error in [(0.9, 1.0), (0.5, 1.0), (0.0, 1.0), (0.9, 0.05)]:
        ctl.set(sparsity=sparsity, max_error=max_error)
        idx, cnt = fn(P)
        assert torch.equal(kept(idx, cnt), guarded_keep(P, sparsity, max_error).cpu())
        counts.append(int(cnt.sum()))
    assert len(compiles) == 1
    assert counts[2] == 2 * 400 and counts[1] > counts[0] and counts[3] > counts[0]


def test_bad_guard_arguments():
    P = torch.rand(1, 1, 4, 4)
    with pytest.raises(ValueError, match="max_error must be a number in"):
        select_blocks_guarded(P, 0.9, 0.0)
    with pytest.raises(ValueError, match="sparsity must be"):
        RuntimeControl(sparsity=1.0)
    with pytest.raises(ValueError, match="max_error must be"):
        RuntimeControl().set(max_error=2)


@pytest.mark.gpu
def test_run_time_control_under_cuda_graph_replays():
    """Captured once, replayed with new control values: each replay selects for the values set before it."""
    P = random_map(2, 3, 64, "cuda")
    ctl = RuntimeControl(sparsity=0.9)
    select_blocks_guarded(P, control_key=ctl.key)  # warm-up: kernels compiled, the control tensor made
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = select_blocks_guarded(P, control_key=ctl.key)
    for sparsity, max_error in [(0.5, 1.0), (0.95, 0.02), (0.9, 1.0)]:
        ctl.set(sparsity=sparsity, max_error=max_error)
        graph.replay()
        assert torch.equal(kept(*out), guarded_keep(P, sparsity, max_error).cpu())


def test_select_blocks_guarded_opcheck(device):
    from torch.library import opcheck
    P = random_map(1, 2, 12, device)
    opcheck(torch.ops.draftopt.select_blocks_guarded.default, (P, 0.8, 0.1, -1))
