"""draftopt as a diffusers attention backend (issue 15, item 3): the same ops through diffusers' attention
dispatcher, with the geometry from the model's config and the latent of each call; eager or compiled."""

import subprocess
import sys
import warnings

import pytest
import torch

import draftopt
from draftopt.backend import DraftoptWarning

from ..models import hunyuan_inputs, tiny_hunyuan, tiny_wan, wan_inputs
from ..reference_model import reference_attention

pytest.importorskip("diffusers")
from diffusers.models import attention_dispatch  # noqa: E402

import draftopt.diffusers_backend as db  # noqa: E402

# Tiny models: 2x8x16 = 256 video tokens, 16 tiles of 4x4.
OPTS = dict(tile=(4, 4), min_tokens=0, policy="topk")
GRID = (2, 8, 16)
MODELS = {
    "wan": (lambda: tiny_wan(layers=1), wan_inputs, 0),
    "hunyuan": (lambda: tiny_hunyuan(layers=1, single_layers=1), hunyuan_inputs, 8),
}


def build(name):
    make, inputs, text_len = MODELS[name]
    return make(), inputs(), text_len


def dense_warnings(caught):
    return [str(w.message) for w in caught if issubclass(w.category, DraftoptWarning)]


@pytest.fixture(autouse=True)
def _native_stays_the_active_backend():
    """model.set_attention_backend sets diffusers' process-wide backend too: put it back after each test."""
    registry = attention_dispatch._AttentionBackendRegistry
    before = registry._active_backend
    yield
    registry.set_active_backend(before)


def test_import_draftopt_does_not_import_diffusers():
    code = "import sys, draftopt; assert 'diffusers' not in sys.modules, 'diffusers imported'; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize("name", ["wan", "hunyuan"])
@torch.no_grad()
def test_sparsity_zero_matches_the_native_backend(name):
    model, inputs, text_len = build(name)
    want = model(**inputs)[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = draftopt.use_attention_backend(model, sparsity=0.0, **OPTS)
        got = model(**inputs)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not dense_warnings(caught)  # cross-attention and text-only attention are no candidates
    rep = draftopt.report(model)
    assert rep.graphs == handle.records and rep.graphs[0].source == "diffusers backend"
    rewritten = [(s.name, s.grid, s.text_len, s.text_position, s.mask_form) for s in rep.rewritten]
    if name == "wan":
        assert rewritten == [("blocks.0.attn1", GRID, 0, None, "")]
        (cross,) = rep.skipped
        assert cross.name == "blocks.0.attn2" and "cross-attention" in cross.reason and not cross.candidate
    else:  # dual- and single-stream joint attention; the padded prompt is a key padding mask
        assert rewritten == [("transformer_blocks.0.attn", GRID, text_len, "end", "key padding"),
                             ("single_transformer_blocks.0.attn", GRID, text_len, "end", "key padding")]
    assert "patch (1, 2, 2) from model.config" in rep.rewritten[0].grid_source
    handle.remove()
    torch.testing.assert_close(model(**inputs)[0], want)  # the model's own backend again


@torch.no_grad()
def test_strips_through_the_backend_with_a_key_mask():
    """tile="strips" reaches the backend's sites: HunyuanVideo's padded prompt (a key mask) and its text, at
    sparsity 0 the native output; the report shows the layout."""
    model, inputs, text_len = build("hunyuan")
    want = model(**inputs)[0]
    handle = draftopt.use_attention_backend(model, sparsity=0.0, **dict(OPTS, tile="strips"))
    torch.testing.assert_close(model(**inputs)[0], want, atol=1e-5, rtol=1e-5)
    rep = draftopt.report(model)
    assert {(s.grid, s.tile, s.layout, s.mask_form) for s in rep.rewritten} == {
        (GRID, (1, 128), "strips", "key padding")}
    handle.remove()


@pytest.mark.parametrize("name", ["wan", "hunyuan"])
@torch.no_grad()
def test_sparse_calls_run_draft_attention_and_are_reported(name):
    """At 0.9 every video self-attention call is draft attention: the output is the reference op's (the same
    model with SDPA replaced by draftopt.kernels.draft_attention) and differs from dense."""
    model, inputs, text_len = build(name)
    dense = model(**inputs)[0]
    with reference_attention(GRID, text_len, "end", sparsity=0.9, tile=(4, 4), policy="topk") as calls:
        want = model(**inputs)[0]
    assert len(calls) == (1 if name == "wan" else 2)
    handle = draftopt.use_attention_backend(model, sparsity=0.9, **OPTS)
    got = model(**inputs)[0]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    assert (got - dense).abs().max() > 1e-3
    rep = draftopt.report(model)
    assert len(rep.rewritten) == len(calls) and all(s.sparsity == 0.9 and s.policy == "topk" for s in rep.rewritten)
    text = str(rep)
    assert "diffusers" in text and "through the diffusers backend" in text and "rewritten" in text
    assert rep.totals()["attention_flops_saved"] > 0.5
    again = draftopt.Report.from_json(rep.to_json())
    assert again.graphs[0].source == "diffusers backend" and len(again.rewritten) == len(calls)
    assert any(g is rep.graphs[0] for g in draftopt.report().graphs)  # the process-wide report too
    handle.remove()


@pytest.mark.parametrize("name", ["wan", "hunyuan"])
@torch.no_grad()
def test_compiled_model_runs_the_backend_inside_its_graph(name):
    """torch.compile(fullgraph=False) of a prepared model: Dynamo traces the backend, whose decisions it makes
    once at trace time; the graph holds the draftopt ops (no graph break, no Python decision at run time)."""
    model, inputs, _ = build(name)
    draftopt.use_attention_backend(model, sparsity=0.9, **OPTS)
    eager = model(**inputs)[0]
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward  # Dynamo's graph as it is: what runs is what it traced

    compiled = torch.compile(model, backend=backend, fullgraph=False)
    torch.testing.assert_close(compiled(**inputs)[0], eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled(**inputs)[0], eager, atol=1e-5, rtol=1e-5)  # no recompile needed
    assert len(graphs) == 1
    ops = [str(n.target) for n in graphs[0].graph.nodes if "draftopt" in str(n.target)]
    assert ops.count("draftopt.tiled_attention.default") == len(draftopt.report(compiled).rewritten)


@torch.no_grad()
def test_each_resolution_gets_its_own_geometry_under_compile():
    """torch.compile's default dynamic shapes: the second latent shape recompiles with its own grid (the plan's
    arguments are constants to Dynamo); fullgraph=True holds."""
    model = tiny_wan(layers=1)
    handle = draftopt.use_attention_backend(model, sparsity=0.5, **OPTS)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    for latent in [(2, 16, 32), (2, 16, 16)]:
        inputs = wan_inputs(latent=latent)
        with reference_attention((2, latent[1] // 2, latent[2] // 2), 0, "end", sparsity=0.5, tile=(4, 4),
                                 policy="topk"):
            want = tiny_wan_copy(model)(**inputs)[0]
        torch.testing.assert_close(compiled(**inputs)[0], want, atol=2e-5, rtol=2e-5)
    assert [s.grid for s in handle.report().rewritten] == [(2, 8, 16), (2, 8, 8)]


def tiny_wan_copy(model):
    """A copy of ``model`` without the backend's hooks (the reference runs native attention)."""
    copy = tiny_wan(layers=1)
    copy.load_state_dict(model.state_dict())
    return copy


@torch.no_grad()
def test_dense_calls_warn_once_with_the_reason():
    """Too few tokens for the default min_tokens: every video self-attention call stays dense, one
    DraftoptWarning says why; strict=True raises instead."""
    model, inputs = tiny_wan(layers=2), wan_inputs()
    want = model(**inputs)[0]
    draftopt.use_attention_backend(model, sparsity=0.9, tile=(4, 4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = model(**inputs)[0]
        model(**inputs)
    torch.testing.assert_close(got, want)
    (message,) = dense_warnings(caught)
    assert "stays dense" in message and "too few tokens: 256 visual tokens < min_tokens=8192" in message
    skipped = [s for s in draftopt.report(model).skipped if s.candidate]
    assert [s.name for s in skipped] == ["blocks.0.attn1", "blocks.1.attn1"]
    draftopt.use_attention_backend(model, sparsity=0.9, tile=(4, 4), strict=True)
    with pytest.raises(draftopt.backend.DenseSitesError, match="too few tokens"):
        model(**inputs)


@torch.no_grad()
def test_dense_steps_run_native_attention():
    model, inputs = tiny_wan(layers=1), wan_inputs()
    want = model(**inputs)[0]
    handle = draftopt.use_attention_backend(model, sparsity=0.9, **OPTS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with handle.dense():
            torch.testing.assert_close(model(**inputs)[0], want)
    assert not dense_warnings(caught)  # asked for: no warning
    assert "dense mode" in handle.report().graphs[-1].sites[0].reason
    assert (model(**inputs)[0] - want).abs().max() > 1e-3  # sparse again


@torch.no_grad()
def test_set_attention_backend_and_the_context_manager():
    """After register(), diffusers' own ways of choosing a backend work; the hooks (set_backend=False) give the
    latent. A model never prepared runs native attention, with one warning."""
    model, inputs = tiny_wan(layers=1), wan_inputs()
    want = model(**inputs)[0]
    handle = draftopt.use_attention_backend(model, sparsity=0.9, set_backend=False, **OPTS)
    torch.testing.assert_close(model(**inputs)[0], want)  # hooks only: still native
    assert db.register() is attention_dispatch.AttentionBackendName.DRAFTOPT
    model.set_attention_backend("draftopt")
    sparse = model(**inputs)[0]
    assert (sparse - want).abs().max() > 1e-3 and handle.report().rewritten
    model.reset_attention_backend()
    attention_dispatch._AttentionBackendRegistry.set_active_backend(attention_dispatch.AttentionBackendName.NATIVE)
    with attention_dispatch.attention_backend("draftopt"):
        torch.testing.assert_close(model(**inputs)[0], sparse)
    other = tiny_wan(layers=1)
    other.load_state_dict(model.state_dict())
    db._WARNED_UNPREPARED = False
    with warnings.catch_warnings(record=True) as caught, attention_dispatch.attention_backend("draftopt"):
        warnings.simplefilter("always")
        torch.testing.assert_close(other(**inputs)[0], want)
    (message,) = dense_warnings(caught)
    assert "outside a model prepared with draftopt.use_attention_backend" in message


@torch.no_grad()
def test_remove_restores_the_models_backends():
    model, inputs = tiny_wan(layers=1), wan_inputs()
    processors = [m.processor for _, m in db._attention_modules(model)]
    before = [p._attention_backend for p in processors]
    with draftopt.use_attention_backend(model, sparsity=0.9, **OPTS) as handle:
        assert all(p._attention_backend == "draftopt" for p in processors)
        model(**inputs)
    assert not handle.active and [p._attention_backend for p in processors] == before
    assert draftopt.report(model).rewritten  # the records stay


def test_bad_arguments_are_refused_naming_the_value():
    model = tiny_wan(layers=1)
    with pytest.raises(ValueError, match="compiler='eager' does not apply to the diffusers backend"):
        draftopt.use_attention_backend(model, compiler="eager")
    with pytest.raises(ValueError, match="dense_layers=2 does not apply"):
        draftopt.use_attention_backend(model, dense_layers=2)
    with pytest.raises(ValueError, match="sparsity must be a number in"):
        draftopt.use_attention_backend(model, sparsity=1.5)
    with pytest.raises(ValueError, match="no attention module whose processor goes through"):
        draftopt.use_attention_backend(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="already wrapped by torch.compile"):
        draftopt.use_attention_backend(torch.compile(model))
    with pytest.raises(ValueError, match="prepared with draftopt.use_attention_backend"):
        draftopt.report(tiny_wan(layers=1))


@torch.no_grad()
def test_framepack_history_is_not_placed_by_guess():
    """FramePack called with history latents: the call shows neither how many history tokens precede the grid
    nor how many text tokens follow it, so it stays native, saying what to use; told the count, it is sparse
    and equals the reference op."""
    from ..models import framepack_inputs, tiny_framepack

    model, inputs = tiny_framepack(), framepack_inputs()
    want = model(**inputs)[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = draftopt.use_attention_backend(model, sparsity=0.9, **OPTS)
        torch.testing.assert_close(model(**inputs)[0], want, atol=2e-5, rtol=2e-5)
    assert any("called with history latents" in m and "text_position=<tokens before the grid>" in m
               for m in dense_warnings(caught))
    handle.remove()
    with reference_attention(GRID, 179, 168, sparsity=0.9, tile=(4, 4), policy="topk") as calls:
        ref = model(**inputs)[0]
    handle = draftopt.use_attention_backend(model, sparsity=0.9, text_position=168, **OPTS)
    torch.testing.assert_close(model(**inputs)[0], ref, atol=2e-5, rtol=2e-5)
    assert len(calls) == 2 and [s.text_position for s in draftopt.report(model).rewritten] == [168, 168]
    handle.remove()
