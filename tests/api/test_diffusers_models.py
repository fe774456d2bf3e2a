"""The pass on real diffusers transformers (tiny configs, random weights, CPU)."""

import pytest
import torch

import draftopt

from ..helpers import CPU_OPTIONS
from ..models import flux_inputs, hunyuan_inputs, sd3_inputs, tiny_flux, tiny_hunyuan, tiny_sd3, tiny_wan, wan_inputs
from ..reference_model import reference_attention

pytest.importorskip("diffusers")

# Tiny models have 2x8x16 = 256 video tokens: tiles of 4x4 give 16 tiles.
OPTS = {**CPU_OPTIONS, "fullgraph": True}
EAGER = {**OPTS, "compiler": "eager"}  # where the geometry is the point: no AOT trace of the rewritten graph


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
    with pytest.raises(ValueError, match=r"latent_shape \(4, 32, 64\) does not match .* is \(1, 4, 2, 16, 32\)"):
        model(**wan_inputs())
    smaller = draftopt.optimize(tiny_wan(), latent_shape=(2, 16, 16), sparsity=0.9, **OPTS)
    with pytest.raises(ValueError, match=r"latent_shape \(2, 16, 16\) does not match .*T, H, W = 2x16x32") as e:
        smaller(**wan_inputs())
    assert_says_what_to_do(str(e.value))
    assert not draftopt.report(smaller).rewritten


def assert_says_what_to_do(message: str) -> None:
    """The fix a latent_shape error names: read each call's grid off the graph, or this call's latent_shape (it
    used to suggest text_position, which, followed, rewrote with the wrong grid)."""
    assert "latent_shape=None" in message and "optimize again with latent_shape=(2, 16, 32)" in message, message
    assert "text_position" not in message, message


@torch.no_grad()
@pytest.mark.parametrize("latent_shape", [(2, 16, 16), (2, 32, 16), (2, 32, 32)],
                         ids=["fewer-tokens", "as-many-tokens", "more-tokens"])
def test_latent_shape_of_another_resolution_with_text(latent_shape):
    """Issue 15 item 7, HunyuanVideo (8 text tokens after the video in each self-attention), called at 2x16x32:
    fewer tokens (whose rest would pass for text), as many in another grid, more. Each is refused before any
    site is rewritten, with what to do."""
    model = draftopt.optimize(tiny_hunyuan(layers=1, single_layers=1), latent_shape=latent_shape, sparsity=0.5,
                              **OPTS)
    with pytest.raises(ValueError, match=rf"latent_shape \({latent_shape[0]}, {latent_shape[1]}, {latent_shape[2]}\) "
                                         r"does not match .*T, H, W = 2x16x32") as e:
        model(**hunyuan_inputs())
    assert_says_what_to_do(str(e.value))
    assert not draftopt.report(model).rewritten


@torch.no_grad()
@pytest.mark.parametrize("make, inputs", [(tiny_wan, wan_inputs), (tiny_hunyuan, hunyuan_inputs)],
                         ids=["wan", "hunyuan"])
def test_regional_latent_shape_of_another_resolution_says_what_to_do(make, inputs):
    """The same with regional=True (the blocks' graphs see tokens only: each call's latent is checked before
    any block runs): the error names this call's latent_shape, and regional=False with latent_shape=None."""
    model = draftopt.optimize(make(), latent_shape=(2, 16, 16), sparsity=0.5, regional=True, **CPU_OPTIONS)
    with pytest.raises(ValueError, match=r"latent_shape \(2, 16, 16\) does not match .*T, H, W = 2x16x32\)") as e:
        model(**inputs())
    message = str(e.value)
    assert "optimize again with latent_shape=(2, 16, 32)" in message
    assert "regional=False and latent_shape=None" in message and "text_position" not in message
    assert not draftopt.report(model).graphs  # refused before anything was compiled


@torch.no_grad()
def test_image_dit_gets_one_frame_off_its_patch_embedding():
    """An image DiT (SD3: a Conv2d patch embedding, 8 text tokens at the end of the joint attention) is a video
    of one frame: the grid (1, H, W) comes off the patch embedding, sparsity 0 matches the original, and the
    sparse model matches the reference op on that grid."""
    sd3, inputs = tiny_sd3(layers=1), sd3_inputs(latent=(16, 32))  # patch 2: 1x8x16 = 128 image tokens
    want = sd3(**inputs)[0]
    exact = draftopt.optimize(sd3, sparsity=0.0, **EAGER)
    torch.testing.assert_close(exact(**inputs)[0], want, atol=2e-5, rtol=2e-5)
    sites = draftopt.report(exact).rewritten
    (site,) = sites
    assert (site.name, site.grid, site.text_len, site.text_position) == ("transformer_blocks.0.attn", (1, 8, 16), 8,
                                                                         "end")
    assert site.grid_source.startswith("output of per-frame patch embedding")
    sparse = draftopt.optimize(sd3, sparsity=0.75, **EAGER)
    got = sparse(**inputs)[0]
    with reference_attention((1, 8, 16), 8, "end", sparsity=0.75, tile=(4, 4)) as calls:
        want_sparse = sd3(**inputs)[0]
    assert len(calls) == 1
    torch.testing.assert_close(got, want_sparse, atol=2e-5, rtol=2e-5)
    assert (got - want).abs().max() > 1e-3


@torch.no_grad()
def test_packed_image_tokens_need_latent_shape():
    """Flux (packed tokens [B, H * W, C], a Linear embedding, config patch_size=1: the pipeline packs 2x2 latent
    patches): no grid in the graph, so the sites stay dense and say to pass latent_shape; with the latent's
    (1, H, W) and patch_size=(1, 2, 2) (or latent_shape=(1, H / 2, W / 2)) they are rewritten, unverified."""
    flux, inputs = tiny_flux(), flux_inputs(grid=(8, 16))
    want = flux(**inputs)[0]
    unknown = draftopt.optimize(flux, sparsity=0.5, **EAGER)
    torch.testing.assert_close(unknown(**inputs)[0], want)
    assert {s.reason for s in draftopt.report(unknown).sites} == {
        "no geometry: pass latent_shape=(T, H, W) (no patch embedding found in this graph)"}
    model = draftopt.optimize(flux, latent_shape=(1, 16, 32), patch_size=(1, 2, 2), sparsity=0.0, **EAGER)
    torch.testing.assert_close(model(**inputs)[0], want, atol=2e-5, rtol=2e-5)
    sites = draftopt.report(model).rewritten
    assert [s.name for s in sites] == ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
    assert {(s.grid, s.text_len, s.text_position) for s in sites} == {((1, 8, 16), 8, "start")}
    assert "unverified" in sites[0].grid_source


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


@torch.no_grad()
def test_framepack_history_before_the_grid_and_text_after_it():
    """FramePack: 168 history tokens (1 clean frame, 2 frames at 2x, 4 at 4x) before the 256 video tokens,
    8 text + 3 image tokens after them. Dynamo breaks the graph before the blocks (the mask loop), so the
    blocks' graphs get the [history, video] stream as an input: the family's layout places the grid, the text
    comes from the graph. Exact at sparsity 0; sparse equals the reference op told the geometry directly."""
    from ..models import framepack_inputs, tiny_framepack

    fp, inputs = tiny_framepack(), framepack_inputs()
    want = fp(**inputs)[0]
    model = draftopt.optimize(fp, latent_shape=(2, 16, 32), sparsity=0.0, **CPU_OPTIONS)
    torch.testing.assert_close(model(**inputs)[0], want, atol=2e-5, rtol=2e-5)
    rewritten = draftopt.report(model).rewritten
    assert [(s.grid, s.text_len, s.text_position) for s in rewritten] == [((2, 8, 16), 179, 168)] * 2
    assert "168@start+11@end" in str(draftopt.report(model))

    sparse = draftopt.optimize(model, sparsity=0.6)  # the same model, reconfigured
    with reference_attention((2, 8, 16), 179, 168, sparsity=0.6, tile=(4, 4)) as calls:
        ref = fp(**inputs)[0]
    assert len(calls) == 2
    got = sparse(**inputs)[0]
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)
    assert (got - want).abs().max() > 1e-3  # sparsity changed the output


@torch.no_grad()
def test_attention_that_dynamo_runs_eagerly_is_told():
    """Mochi's processor loops over the batch with torch.nonzero: Dynamo skips the frames that hold its joint
    attention, so no graph has a video self-attention site to rewrite or report. The user is told."""
    from diffusers import MochiTransformer3DModel

    model = MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=1,
                                    pooled_projection_dim=16, in_channels=4, text_embed_dim=16, time_embed_dim=16,
                                    max_sequence_length=8).eval()
    mask = torch.zeros(2, 8, dtype=torch.long)
    mask[0, :5], mask[1, :] = 1, 1
    inputs = dict(hidden_states=torch.randn(2, 4, 2, 16, 32), encoder_hidden_states=torch.randn(2, 8, 16),
                  timestep=torch.full((2,), 500), encoder_attention_mask=mask, return_dict=False)
    want = model(**inputs)[0]
    optimized = draftopt.optimize(model, sparsity=0.5, **CPU_OPTIONS)
    with pytest.warns(draftopt.DraftoptWarning, match="MochiTransformer3DModel has .* attention modules, but no "
                                                      "compiled graph holds a video self-attention call"):
        got = optimized(**inputs)[0]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    assert not draftopt.report(optimized).rewritten
