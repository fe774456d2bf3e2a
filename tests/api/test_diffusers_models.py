"""The pass on real diffusers transformers (tiny configs, random weights, CPU)."""

import pytest
import torch

import draftopt

from ..helpers import CPU_OPTIONS
from ..models import hunyuan_inputs, tiny_hunyuan, tiny_wan, wan_inputs
from ..reference_model import reference_attention

pytest.importorskip("diffusers")

# Tiny models have 2x8x16 = 256 video tokens: tiles of 4x4 give 16 tiles.
OPTS = {**CPU_OPTIONS, "fullgraph": True}


def statuses(model):
    return {s.name: (s.status, s.reason) for s in draftopt.report(model).sites}


@torch.no_grad()
def test_wan_sparsity_zero_matches_original():
    wan = tiny_wan()
    inputs = wan_inputs()
    want = wan(**inputs)[0]
    model = draftopt.optimize(wan, sparsity=0.0, **OPTS)
    got = model(**inputs)[0]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    st = statuses(model)
    assert [n for n, (s, _) in st.items() if s == "rewritten"] == ["blocks.0.attn1", "blocks.1.attn1"]
    assert st["blocks.0.attn2"][0] == "skipped" and "cross-attention" in st["blocks.0.attn2"][1]
    site = draftopt.report(model).rewritten[0]
    assert site.grid == (2, 8, 16) and site.text_len == 0 and site.tile == (4, 4)


@torch.no_grad()
def test_wan_sparse_matches_reference_op():
    wan = tiny_wan()
    inputs = wan_inputs()
    model = draftopt.optimize(wan, sparsity=0.75, **OPTS)
    got = model(**inputs)[0]
    with reference_attention((2, 8, 16), 0, "end", sparsity=0.75, tile=(4, 4)) as calls:
        want = wan(**inputs)[0]
    assert len(calls) == 2
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    # and sparsity really changed the output
    assert (got - wan(**inputs)[0]).abs().max() > 1e-3


@torch.no_grad()
def test_hunyuan_sparsity_zero_matches_original_with_padded_text():
    hy = tiny_hunyuan()
    inputs = hunyuan_inputs()
    want = hy(**inputs)[0]
    model = draftopt.optimize(hy, sparsity=0.0, **OPTS)
    got = model(**inputs)[0]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    rep = draftopt.report(model)
    assert len(rep.rewritten) == 4  # 2 dual-stream + 2 single-stream joint attentions
    for s in rep.rewritten:
        assert (s.grid, s.text_len, s.text_position, s.has_mask) == ((2, 8, 16), 8, "end", True)
    (refiner,) = rep.skipped
    assert refiner.name == "context_embedder.token_refiner.refiner_blocks.0.attn"
    assert "sequence length 8 is shorter than every grid" in refiner.reason  # text-only: not a candidate
    assert not refiner.candidate


@torch.no_grad()
def test_hunyuan_sparse_matches_reference_op():
    hy = tiny_hunyuan()
    inputs = hunyuan_inputs()
    model = draftopt.optimize(hy, sparsity=0.75, policy="topk", **OPTS)
    got = model(**inputs)[0]
    with reference_attention((2, 8, 16), 8, "end", sparsity=0.75, policy="topk", tile=(4, 4)) as calls:
        want = hy(**inputs)[0]
    assert len(calls) == 4
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@torch.no_grad()
def test_second_resolution_recompiles_with_its_geometry():
    wan = tiny_wan()
    model = draftopt.optimize(wan, sparsity=0.5, **OPTS)
    for latent, grid in [((2, 16, 32), (2, 8, 16)), ((3, 16, 16), (3, 8, 8))]:
        inputs = wan_inputs(latent=latent)
        got = model(**inputs)[0]
        with reference_attention(grid, 0, "end", sparsity=0.5, tile=(4, 4)):
            want = wan(**inputs)[0]
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    graphs = draftopt.report(model).graphs
    assert [g.sites[0].grid for g in graphs] == [(2, 8, 16), (3, 8, 8)]


@torch.no_grad()
def test_latent_shape_that_disagrees_with_the_graph_is_an_error():
    """A latent_shape that is not the latent the model is called with (here a larger one): a ValueError
    naming both shapes at compile time, not a wrong grid (it used to skip every site, or with text at the
    start treat the rest of the video tokens as text)."""
    model = draftopt.optimize(tiny_wan(), latent_shape=(4, 32, 64), sparsity=0.9, **OPTS)
    with pytest.raises(ValueError, match=r"latent_shape \(4, 32, 64\) does not match .* gets \(1, 4, 2, 16, 32\)"):
        model(**wan_inputs())
    smaller = draftopt.optimize(tiny_wan(), latent_shape=(2, 16, 16), sparsity=0.9, **OPTS)
    with pytest.raises(ValueError, match=r"latent_shape \(2, 16, 16\) does not match .*T, H, W = 2x16x32"):
        smaller(**wan_inputs())


@torch.no_grad()
def test_latent_shape_with_patch_stride_from_graph():
    model = draftopt.optimize(tiny_wan(), latent_shape=(2, 16, 32), sparsity=0.5, **OPTS)
    model(**wan_inputs())
    site = draftopt.report(model).rewritten[0]
    assert site.grid == (2, 8, 16) and "stride" in site.grid_source


@torch.no_grad()
def test_dense_warmup_switches_without_recompiling():
    wan = tiny_wan()
    inputs = wan_inputs()
    want_dense = wan(**inputs)[0]
    model = draftopt.optimize(wan, sparsity=0.9, **OPTS)
    sparse = model(**inputs)[0]
    for _ in range(3):  # dense / sparse / dense ...: two graphs in all
        with draftopt.dense(model):
            torch.testing.assert_close(model(**inputs)[0], want_dense, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(model(**inputs)[0], sparse)
    graphs = draftopt.report(model).graphs
    assert len(graphs) == 2
    assert [s.status for s in graphs[1].sites] == ["skipped"] * 4
    assert "dense mode" in graphs[1].sites[0].reason


@torch.no_grad()
def test_dense_layers_keeps_the_first_sites_dense():
    model = draftopt.optimize(tiny_wan(), sparsity=0.5, dense_layers=1, **OPTS)
    model(**wan_inputs())
    st = statuses(model)
    assert st["blocks.0.attn1"] == ("skipped", "kept dense (dense_layers=1)")
    assert st["blocks.1.attn1"][0] == "rewritten"


@torch.no_grad()
def test_min_tokens_skips_small_sites():
    model = draftopt.optimize(tiny_wan(), sparsity=0.5, **{**OPTS, "min_tokens": 1000})
    model(**wan_inputs())
    reasons = [s.reason for s in draftopt.report(model).sites if s.name.endswith("attn1")]
    assert reasons and all("256 visual tokens < min_tokens=1000" in r for r in reasons)


@torch.no_grad()
def test_dense_warmup_callback_runs_the_first_steps_dense():
    wan = tiny_wan()
    inputs = wan_inputs()
    model = draftopt.optimize(wan, sparsity=0.9, **OPTS)
    callback = draftopt.DenseWarmup(model, steps=2)
    dense_out, kinds = wan(**inputs)[0], []
    for step in range(4):  # what a diffusers pipeline does: call, then callback_on_step_end
        out = model(**inputs)[0]
        kinds.append("dense" if torch.allclose(out, dense_out, atol=2e-5, rtol=2e-5) else "sparse")
        assert callback(None, step, 0, {"latents": out}) == {"latents": out}
    assert kinds == ["dense", "dense", "sparse", "sparse"]
    with pytest.raises(ValueError, match="steps must be an int >= 0"):
        draftopt.DenseWarmup(model, steps=-1)
