"""Masks built as query mask AND key mask (issue 15, item 2): the outer product of one padding vector, as
HunyuanVideo 1.5 builds its self-attention mask, is key padding plus query rows that attend to nothing."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import draftopt
from draftopt.backend import DraftoptWarning
from draftopt.passes.masks import masked_row_value, outer_product_mask

from ..helpers import CPU_OPTIONS
from ..models import PaddedTextDiT, hunyuan15_inputs, tiny_hunyuan15
from .test_sites import capture

N_VIDEO = 2 * 4 * 8  # PaddedTextDiT's default latent (2, 8, 16) in 1x2x2 patches
EAGER = dict(compiler="eager")


def padded_rows(text_mask):
    """[B, L] bool: the token rows the padding vector hides (padded text; video is never padding)."""
    return F.pad(text_mask == 0, (N_VIDEO, 0), value=False)


def test_sdpa_gives_fully_masked_rows_zeros_on_the_cpu():
    """What the rewrite reproduces: torch 2.13's CPU SDPA (math and flash paths) returns 0 for a query row whose
    bool mask is all False (not NaN, not the mean of v)."""
    q, k, v = torch.randn(3, 1, 2, 6, 16).unbind(0)
    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool)
    mask[..., 2, :] = False
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert (out[:, :, 2] == 0).all()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert masked_row_value(torch.device("cpu"), dtype, 16) == "zero"


@pytest.mark.parametrize("style", ["repeat", "index", "logical_and"])
@torch.no_grad()
def test_outer_product_mask_at_sparsity_zero_matches_the_original(style):
    """Every row equal to the original, the padded text rows (which attend to nothing) included; the [B, 1, L, L]
    mask is gone from the graph."""
    model = PaddedTextDiT(style).eval()
    latent, text, text_mask = PaddedTextDiT.inputs(style=style)
    want = model(latent, text, text_mask)
    # HunyuanVideo 1.5's spelling through aot_eager (fake tensors through the inserted nodes), the others eager
    optimized = draftopt.optimize(model, sparsity=0.0, **dict(CPU_OPTIONS, **({} if style == "repeat" else EAGER)))
    got = optimized(latent, text, text_mask)
    pad = padded_rows(text_mask)
    assert pad.sum() == 3  # sample 0 has 5 of 8 text tokens
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[pad], want[pad], atol=1e-6, rtol=1e-6)
    rep = draftopt.report(optimized)
    assert [(s.status, s.mask_form, s.text_len, s.text_position) for s in rep.sites] == \
        [("rewritten", "query x key padding", 8, "end")] * 2
    after = rep.graphs[0].counts_after
    assert not after.get("and_") and not after.get("torch.logical_and") and not after.get(".repeat")
    assert "query x key padding" in str(rep)


@torch.no_grad()
def test_outer_product_mask_sparse_keeps_the_padded_rows_exact():
    """At sparsity 0.5 the video rows change, the padded rows get exactly what SDPA gives them (0 attention, so
    each block adds only its output bias), and the sites are reported as rewritten."""
    model = PaddedTextDiT("repeat").eval()
    latent, text, text_mask = PaddedTextDiT.inputs()
    want = model(latent, text, text_mask)
    optimized = draftopt.optimize(model, sparsity=0.5, **CPU_OPTIONS)
    got = optimized(latent, text, text_mask)
    pad = padded_rows(text_mask)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[pad], want[pad], atol=1e-6, rtol=1e-6)
    assert (got[:, :N_VIDEO] - want[:, :N_VIDEO]).abs().max() > 1e-4  # sparsity did something
    sites = draftopt.report(optimized).sites
    assert [(s.status, s.sparsity, s.mask_form) for s in sites] == [("rewritten", 0.5, "query x key padding")] * 2


@pytest.mark.parametrize("style", ["two_vectors", "input"])
@torch.no_grad()
def test_a_mask_the_graph_does_not_prove_an_outer_product_stays_dense(style):
    """A query mask and a different key mask, or a [B, 1, L, L] mask that arrives as an input: nothing in the
    graph proves the outer-product form, and its values cannot be checked without a host sync."""
    model = PaddedTextDiT(style).eval()
    inputs = PaddedTextDiT.inputs(style=style)
    want = model(*inputs)
    optimized = draftopt.optimize(model, sparsity=0.5, **CPU_OPTIONS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = optimized(*inputs)
    torch.testing.assert_close(got, want)
    for s in draftopt.report(optimized).sites:
        assert s.status == "skipped" and s.candidate
        assert "attn_mask of shape (2, 1, 72, 72) is not a key padding mask" in s.reason
        assert "nor proven by the graph to be the outer product of one padding vector" in s.reason
    assert any(issubclass(w.category, DraftoptWarning) and "not a key padding mask" in str(w.message)
               for w in caught)


@torch.no_grad()
def test_hunyuan_video_15_self_attention_is_rewritten():
    """diffusers' HunyuanVideo 1.5 (tiny): its forward graph-breaks before the blocks (a data-dependent branch and
    the reordering of valid text tokens), so the blocks' graph gets latent_shape; its mask, built in the processor
    as (m1 & m1.transpose(2, 3)), is recognised, and sparsity 0 matches the original."""
    pytest.importorskip("diffusers")
    model, inputs = tiny_hunyuan15(), hunyuan15_inputs()
    want = model(**inputs)[0]
    optimized = draftopt.optimize(model, latent_shape=(2, 8, 16), sparsity=0.0, **dict(CPU_OPTIONS, **EAGER))
    got = optimized(**inputs)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    (site,) = draftopt.report(optimized).rewritten
    assert (site.mask_form, site.grid, site.text_len, site.text_position) == ("query x key padding", (2, 8, 16),
                                                                              13, "end")


def _mask_of(build, m, L=N_VIDEO):
    """outer_product_mask on the SDPA mask node of a captured graph that builds the mask from m."""
    q = torch.randn(m.shape[0], 2, L, 16)

    def f(q, m):
        return F.scaled_dot_product_attention(q, q, q, attn_mask=build(m))

    gm = capture(f, q, m)
    (sdpa,) = [n for n in gm.graph.nodes if n.op == "call_function" and "scaled_dot_product" in str(n.target)]
    return outer_product_mask(sdpa.kwargs["attn_mask"], m.shape[0], 2, L)


@pytest.mark.parametrize("build, axes", [
    (lambda m: m[:, None, :, None] & m[:, None, None, :], (0, None, 1)),
    (lambda m: (m.unsqueeze(1).unsqueeze(3) * m.unsqueeze(1).unsqueeze(2)), (0, None, 1)),
    (lambda m: m.view(2, 1, 1, -1).expand(2, 1, N_VIDEO, N_VIDEO).permute(0, 1, 3, 2) & m.view(2, 1, 1, -1),
     (0, None, 1)),
    (lambda m: (lambda x: torch.logical_and(x[:, None, :, None], x[:, None, None, :]))(m.long()), (0, None, 1)),
    (lambda m: (lambda x: x[:, None] & x[None, :])(m[0]), (None, None, 0)),  # [L, L]: one vector for all
], ids=["index", "mul", "expand-permute", "logical-and-of-longs", "two-dim"])
def test_outer_product_spellings_are_recognised(build, axes):
    m = torch.rand(2, N_VIDEO) > 0.2
    form = _mask_of(build, m)
    assert form is not None and form.axes[1:] == axes[1:]
    if axes[0] is not None:
        assert form.axes[0] == axes[0] and form.batch == 2


@pytest.mark.parametrize("build", [
    lambda m: m[:, None, :, None] & m.flip(1)[:, None, None, :],  # two vectors
    lambda m: m[:, None, None, :] & m[:, None, None, :].expand(2, 1, N_VIDEO, N_VIDEO),  # key padding twice
    lambda m: (m.long()[:, None, :, None] & m.long()[:, None, None, :]).bool(),  # bitwise & of integers
    lambda m: m[:, None, :, None] | m[:, None, None, :],  # OR
    lambda m: m[:, None, :, None] & m[:, None, None, :].roll(1, dims=3),  # a shifted key vector
], ids=["two-vectors", "key-padding-twice", "bitwise-int", "or", "rolled"])
def test_other_masks_are_not_taken_for_an_outer_product(build):
    assert _mask_of(build, torch.rand(2, N_VIDEO) > 0.2) is None


@torch.no_grad()
def test_masked_rows_option_sets_the_fill_of_fully_masked_rows(monkeypatch):
    """Where the probe finds no value it can reproduce (cuDNN on the GPU), the site stays dense and says to pass
    masked_rows; with masked_rows the rows get that value and the rest still matches the original."""
    import draftopt.passes.draft_attention_pass as dap

    monkeypatch.setattr(dap, "masked_row_value", lambda *a: None)  # as on CUDA bf16 (cuDNN)
    model, inputs = tiny_hunyuan15(), hunyuan15_inputs()
    want = model(**inputs)[0]
    default = draftopt.optimize(model, latent_shape=(2, 8, 16), sparsity=0.0, **dict(CPU_OPTIONS, **EAGER))
    torch.testing.assert_close(default(**inputs)[0], want, atol=1e-5, rtol=1e-5)
    assert "masked_rows='zero'" in [s for s in draftopt.report(default).sites if s.candidate][0].reason
    zero = draftopt.optimize(default, masked_rows="zero")
    torch.testing.assert_close(zero(**inputs)[0], want, atol=1e-5, rtol=1e-5)  # the rows are padding
    (site,) = draftopt.report(zero).rewritten
    assert site.mask_form == "query x key padding (masked rows: zero, by masked_rows)"
    with pytest.raises(ValueError, match="masked_rows must be None or one of"):
        draftopt.DraftConfig(masked_rows="garbage")
