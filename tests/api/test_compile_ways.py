"""Sparse however the model is built and compiled (issue 15, items 1, 5 and 6): a patch size known without a
patch convolution in the graph (Linear patch embeddings, regional compilation), torch.compile's default dynamic
shapes, and Dynamo's recompile limit."""

import warnings
from types import SimpleNamespace

import pytest
import torch

import draftopt
import draftopt.api
from draftopt.backend import DraftoptWarning
from draftopt.model_info import model_patch
from draftopt.passes import SiteRecord
from draftopt.report import GraphRecord, Report, site_flops

from ..helpers import CPU_OPTIONS
from ..models import PackedPatchDiT, ToyDiT, tiny_wan, toy_inputs, wan_inputs
from ..reference_model import reference_attention

EAGER = dict(CPU_OPTIONS, compiler="eager")


def _draftopt_warnings(record):
    return [str(w.message) for w in record if issubclass(w.category, DraftoptWarning)]


# -- item 1: the patch size from model.config ------------------------------------------------------------------
@pytest.mark.parametrize("config, patch", [
    (SimpleNamespace(patch_size=(1, 2, 2)), (1, 2, 2)),  # Wan, Cosmos, Kandinsky 5
    ({"patch_size": [1, 2, 2]}, (1, 2, 2)),  # a mapping (diffusers' FrozenDict), a list
    (SimpleNamespace(patch_size=2, patch_size_t=1), (1, 2, 2)),  # HunyuanVideo, LTX-Video, Allegro
    (SimpleNamespace(patch_size=2, patch_size_t=None), (1, 2, 2)),  # CogVideoX 1.0
    (SimpleNamespace(patch_size=2, patch_size_t=2), (2, 2, 2)),  # CogVideoX 1.5
    (SimpleNamespace(patch_size=2), (1, 2, 2)),  # Mochi
    (SimpleNamespace(patch_size=(16, 16, (1, 2, 2))), None),  # a field of another meaning
    (SimpleNamespace(patch_size=0), None),
    (SimpleNamespace(), None),
    (None, None),
])
def test_patch_size_read_off_model_config(config, patch):
    model = torch.nn.Linear(2, 2)
    model.config = config
    assert model_patch(model) == patch


@torch.no_grad()
def test_linear_patch_embedding_is_sparse_with_the_patch_from_model_config():
    """CogVideoX 1.5 style (tokens flattened before a Linear): no convolution shows the patch, so it comes from
    model.config (it used to be (1, 1, 1): a grid 8x too large, every site left dense)."""
    model, inputs = PackedPatchDiT(patch=(2, 2, 2), flat=True).eval(), toy_inputs(latent=(4, 8, 16))
    optimized = draftopt.optimize(model, latent_shape=(4, 8, 16), sparsity=0.75, **EAGER)
    got = optimized(*inputs)
    with reference_attention((2, 4, 8), 7, "start", sparsity=0.75, tile=(4, 4)) as calls:
        want = model(*inputs)
    assert len(calls) == 2
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    sites = draftopt.report(optimized).sites
    assert [s.status for s in sites] == ["rewritten"] * 2 and {s.grid for s in sites} == {(2, 4, 8)}
    assert "patch (2, 2, 2) from model.config; unverified" in sites[0].grid_source


@torch.no_grad()
@pytest.mark.parametrize("text_position", ["auto", "start"])
def test_unverified_latent_shape_at_another_resolution_is_never_rewritten(text_position):
    """A Linear patch embedding over flattened tokens (CogVideoX 1.5 style): nothing in the graph checks
    latent_shape. Called at another resolution, no site may be rewritten with latent_shape's grid, and what is
    said must point at latent_shape, not at text_position."""
    model = PackedPatchDiT(patch=(2, 2, 2), flat=True).eval()
    optimized = draftopt.optimize(model, latent_shape=(4, 8, 16), text_position=text_position, sparsity=0.5,
                                  **EAGER)
    try:
        optimized(*toy_inputs(latent=(4, 16, 16)))  # grid 2x8x8 = 128 tokens; latent_shape's is 2x4x8 = 64
    except ValueError as e:
        reasons = [str(e)]
    else:
        sites = draftopt.report(optimized).sites
        assert not [s.name for s in sites if s.status == "rewritten"], "rewritten with latent_shape's grid"
        reasons = [s.reason for s in sites]
    for reason in reasons:
        assert "latent_shape" in reason and "text_position" not in reason, reason


@torch.no_grad()
def test_packed_patch_embedding_shows_the_grid():
    """Cosmos style (the Linear gets [B, T', H', W', K]): its input is the grid, with or without latent_shape,
    and it checks a given latent_shape."""
    model, inputs = PackedPatchDiT(patch=(1, 2, 2), flat=False).eval(), toy_inputs(latent=(2, 8, 16))
    for latent_shape, source in [(None, "input of Linear patch embedding"), ((2, 8, 16), "checked against")]:
        optimized = draftopt.optimize(model, latent_shape=latent_shape, sparsity=0.0, strict=True, **EAGER)
        torch.testing.assert_close(optimized(*inputs), model(*inputs), atol=2e-5, rtol=2e-5)
        sites = draftopt.report(optimized).rewritten
        assert len(sites) == 2 and sites[0].grid == (2, 4, 8) and source in sites[0].grid_source
    # as many tokens, another grid: optimize() checks the call's latent; the graph checks the Linear's input
    wrong = draftopt.optimize(model, latent_shape=(2, 16, 8), **EAGER)
    with pytest.raises(ValueError, match=r"latent_shape \(2, 16, 8\) does not match .* is \(2, 4, 2, 8, 16\)"):
        wrong(*inputs)
    by_name = torch.compile(model, backend="draftopt", options=dict(latent_shape=(2, 16, 8), **EAGER))
    with pytest.raises(Exception, match=r"grid \(2, 16, 8\) does not match .* gets \(2, 2, 4, 8, 16\)"):
        by_name(*inputs)  # (no model.config by name: patch (1, 1, 1))


@torch.no_grad()
def test_regional_compilation_rewrites_every_block():
    """optimize(..., regional=True) compiles the repeated blocks only (one graph for all of them), with the
    patch from model.config; dense() works, the original model is left uncompiled, each call's latent is
    checked (another resolution with as many tokens would otherwise reuse the grid)."""
    wan, inputs = tiny_wan(), wan_inputs(latent=(2, 16, 32))
    want = wan(**inputs)[0]
    optimized = draftopt.optimize(wan, latent_shape=(2, 16, 32), sparsity=0.0, regional=True, strict=True,
                                  **EAGER)
    torch.testing.assert_close(optimized(**inputs)[0], want, atol=2e-5, rtol=2e-5)
    with draftopt.dense(optimized):
        torch.testing.assert_close(optimized(**inputs)[0], want, atol=2e-5, rtol=2e-5)
    assert all(block._compiled_call_impl is None for block in wan.blocks)
    sparse_graph = draftopt.report(optimized).graphs[0]
    assert [(s.name, s.status) for s in sparse_graph.sites] == [("attn1", "rewritten"), ("attn2", "skipped")]
    assert sparse_graph.sites[0].grid == (2, 8, 16)
    assert "patch (1, 2, 2) from model.config" in sparse_graph.sites[0].grid_source
    with pytest.raises(ValueError, match=r"latent_shape \(2, 16, 32\) does not match .* is \(1, 4, 2, 32, 16\)"):
        optimized(**wan_inputs(latent=(2, 32, 16)))


@pytest.mark.parametrize("kwargs, match", [
    (dict(), r"regional=True needs latent_shape"),
    (dict(latent_shape=(2, 8, 16), dense_layers=1), r"dense_layers=1 with regional=True"),
    (dict(latent_shape=(2, 8, 16), regional="yes"), r"regional must be True or False, got 'yes'"),
])
def test_regional_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        draftopt.optimize(PackedPatchDiT(), **{"regional": True, **kwargs})
    with pytest.raises(ValueError, match=r"ToyDiT has none"):
        draftopt.optimize(ToyDiT(), latent_shape=(2, 8, 16), regional=True)


@torch.no_grad()
def test_compile_repeated_blocks_with_the_backend_by_name():
    """diffusers' own regional compilation takes the backend by name; the options name the geometry."""
    wan, inputs = tiny_wan(), wan_inputs(latent=(2, 16, 32))
    want = wan(**inputs)[0]
    draftopt.reset()
    wan.compile_repeated_blocks(backend="draftopt", options=dict(
        EAGER, latent_shape=(2, 16, 32), patch_size=(1, 2, 2), sparsity=0.0, strict=True))
    torch.testing.assert_close(wan(**inputs)[0], want, atol=2e-5, rtol=2e-5)
    assert [(s.name, s.grid) for s in draftopt.report().rewritten] == [("attn1", (2, 8, 16))]


# -- item 5: torch.compile's default dynamic shapes ------------------------------------------------------------
# torch.compile's default dynamic shapes, sparse and dense graphs, the report and TORCH_TRACE:
# test_report.py::test_report_is_a_torch_trace_artifact (and test_trust.py for equality at three resolutions).


def test_a_symbolic_size_in_a_record_renders():
    """The pass records a symbolic size by its name (a graph handed to it directly; the backend compiles such
    graphs per shape): no FLOP figure, no TypeError."""
    site = SiteRecord("attn", "sdpa", reason="dynamic shapes", q_shape=(1, 2, "s0", 16), kv_shape=(1, 2, "s0", 16))
    report = Report([GraphRecord(index=0, sites=[site])])
    assert site_flops(site) == (None, None) and "1x2xs0x16" in str(report)
    assert Report.from_json(report.to_json()).sites[0].q_shape == (1, 2, "s0", 16)


# -- item 6: the recompile limit ---------------------------------------------------------------------------------
_LATENTS = [(1, 8, 8), (1, 8, 16), (2, 8, 8), (2, 8, 16), (1, 16, 16)]


@torch.no_grad()
def test_dense_warmups_at_many_resolutions_leave_every_sparse_graph():
    """A dense warm-up at each of five resolutions: ten graphs of one model. Dense and sparse used to share
    Dynamo's 8 entries of the model's forward, so the fifth resolution ran uncompiled (dense), unsaid."""
    model = draftopt.optimize(ToyDiT().eval(), sparsity=0.5, **EAGER)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for latent in _LATENTS:
            inputs = toy_inputs(latent=latent)
            with draftopt.dense(model):
                model(*inputs)
            model(*inputs)
    assert _draftopt_warnings(record) == []
    sparse = [g for g in draftopt.report(model).graphs if g.config["enabled"]]
    grids = [g.sites[0].grid for g in sparse if g.sites[0].status == "rewritten"]
    assert grids == [(T, H // 2, W // 2) for T, H, W in _LATENTS]


@torch.no_grad()
def test_a_recompile_limit_hit_is_a_draftopt_warning(monkeypatch):
    monkeypatch.setattr(draftopt.api, "RECOMPILE_LIMIT", 2)
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 2)
    model = draftopt.optimize(ToyDiT().eval(), sparsity=0.5, **EAGER)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for latent in _LATENTS[:3]:
            model(*toy_inputs(latent=latent))
    (message,) = _draftopt_warnings(record)
    assert message.startswith("draftopt: ToyDiT (sparse graphs): torch._dynamo hit config.recompile_limit (2)")
    assert "run uncompiled, with dense attention" in message and "torch._dynamo.config.recompile_limit" in message
    assert len(draftopt.report(model).graphs) == 2
