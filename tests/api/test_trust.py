"""No silent wrong answers, no silent dense: each case here behaved otherwise before (see the trust issue)."""

import warnings

import numpy as np
import pytest
import torch

import draftopt
from draftopt.backend import DenseSitesError, DraftoptWarning

from ..helpers import CPU_OPTIONS
from ..models import TINY_ATTENTION_OPTIONS, TinyAttention, ToyDiT, tiny_wan, toy_inputs, wan_inputs


def _draftopt_warnings(record):
    return [str(w.message) for w in record if issubclass(w.category, DraftoptWarning)]


@torch.no_grad()
def test_dense_video_attention_warns_once_per_graph_with_count_and_reasons():
    model = draftopt.optimize(ToyDiT().eval(), **dict(CPU_OPTIONS, min_tokens=8192))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model(*toy_inputs())
    (message,) = _draftopt_warnings(record)
    assert message.startswith("draftopt: 0 of 2 video self-attention sites rewritten in graph")
    assert "2 x too few tokens: 64 visual tokens < min_tokens=8192" in message


@torch.no_grad()
def test_strict_raises_instead_of_warning():
    model = draftopt.optimize(ToyDiT().eval(), strict=True, **dict(CPU_OPTIONS, min_tokens=8192))
    with pytest.raises(DenseSitesError, match=r"0 of 2 video self-attention sites rewritten .* \(strict=True\)"):
        model(*toy_inputs())


@torch.no_grad()
def test_cross_attention_and_fully_rewritten_graphs_stay_quiet():
    """Wan's cross-attention sites are no candidates: with every self-attention rewritten, no warning."""
    model = draftopt.optimize(tiny_wan(), sparsity=0.5, strict=True, **CPU_OPTIONS)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model(**wan_inputs())
    assert _draftopt_warnings(record) == []
    rep = draftopt.report(model)
    assert len(rep.rewritten) == 2 and all(not s.candidate for s in rep.skipped)


@torch.no_grad()
def test_dense_on_request_stays_quiet():
    model = draftopt.optimize(ToyDiT().eval(), strict=True, dense_layers=2, **CPU_OPTIONS)
    model(*toy_inputs())
    with draftopt.dense(model):
        model(*toy_inputs())


def test_optimize_again_keeps_earlier_options():
    first = draftopt.optimize(ToyDiT().eval(), latent_shape=(2, 8, 16), sparsity=0.8, policy="topk",
                              mode=None, **CPU_OPTIONS)
    again = draftopt.optimize(first, sparsity=0.5)
    cfg = again.draftopt_config
    assert (cfg.sparsity, cfg.policy, cfg.latent_shape, cfg.tile, cfg.compiler) == \
        (0.5, "topk", (2, 8, 16), CPU_OPTIONS["tile"], CPU_OPTIONS["compiler"])
    assert again._orig_mod is first._orig_mod  # rewrites never stack


@pytest.mark.parametrize("value", [np.float32(0.9), np.float64(0.9), torch.tensor(0.9), torch.tensor([0.9])])
def test_numpy_scalars_and_one_element_tensors_are_numbers(value):
    assert draftopt.DraftConfig(sparsity=value).sparsity == 0.9
    assert draftopt.DraftConfig(cdf_threshold=value).cdf_threshold == 0.9


@pytest.mark.parametrize("kwargs, match", [
    (dict(latent_shape=2), r"latent_shape must be three positive ints \(T, H, W\), got 2"),
    (dict(latent_shape=(2, 16)), r"latent_shape must be three positive ints \(T, H, W\), got \(2, 16\)"),
    (dict(latent_shape=(2, 16, 0)), r"got \(2, 16, 0\)"),
    (dict(enabled="no"), "enabled must be True or False, got 'no'"),
    (dict(fuse_permute="False"), "fuse_permute must be True or False, got 'False'"),
    (dict(capture_masks=1), "capture_masks must be True or False, got 1"),
    (dict(strict="yes"), "strict must be True or False, got 'yes'"),
    (dict(sparsity="0.9"), r"sparsity must be a number in \[0, 1\), got '0.9'"),
    (dict(sparsity=True), r"sparsity must be a number in \[0, 1\), got True"),
    (dict(patch_size=(1, 2, 2, 2)), r"patch_size must be an int or \(pt, ph, pw\)"),
])
def test_bad_config_values_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        draftopt.DraftConfig(**kwargs)


@torch.no_grad()
def test_latent_shape_for_another_resolution_is_an_error():
    """A fixed latent_shape and a second resolution: a ValueError naming both, not the wrong grid."""
    model = draftopt.optimize(tiny_wan(), latent_shape=(2, 16, 32), sparsity=0.5, **CPU_OPTIONS)
    model(**wan_inputs(latent=(2, 16, 32)))
    with pytest.raises(ValueError, match=r"latent_shape \(2, 16, 32\) does not match .*\(1, 4, 2, 16, 16\)"):
        model(**wan_inputs(latent=(2, 16, 16)))


@torch.no_grad()
def test_report_says_whether_a_given_latent_shape_was_checked():
    toy = draftopt.optimize(ToyDiT().eval(), latent_shape=(2, 8, 16), **CPU_OPTIONS)
    toy(*toy_inputs())
    assert all("checked against" in s.grid_source for s in draftopt.report(toy).rewritten)
    bare = draftopt.optimize(TinyAttention().eval(), **TINY_ATTENTION_OPTIONS)  # no patch embedding
    bare(TinyAttention.inputs())
    (site,) = draftopt.report(bare).rewritten
    assert "unverified: no patch embedding in this graph" in site.grid_source


@torch.no_grad()
def test_backend_by_name_with_default_dynamic_shapes_rewrites_every_resolution():
    """torch.compile's default makes the second resolution dynamic: that graph is compiled per shape, each
    with its own geometry (it used to skip every site), and matches the original model at sparsity 0."""
    draftopt.reset()
    wan = tiny_wan()
    compiled = torch.compile(wan, backend="draftopt", options=dict(CPU_OPTIONS, sparsity=0.0))
    for latent in [(1, 16, 16), (1, 8, 16), (1, 8, 8)]:
        inputs = wan_inputs(latent=latent)
        torch.testing.assert_close(compiled(**inputs)[0], wan(**inputs)[0], atol=2e-5, rtol=2e-5)
    rep = draftopt.report()
    grids = [s.grid for s in rep.rewritten]
    assert {(1, 8, 8), (1, 4, 8), (1, 4, 4)} <= set(grids), grids
    assert not [s for s in rep.skipped if s.candidate]
    assert "rewritten" in str(rep)
