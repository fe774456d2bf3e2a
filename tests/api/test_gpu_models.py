"""GPU-only: the diffusers models at a larger size, bf16, through optimize() with Inductor."""

import pytest
import torch

import draftopt

from ..helpers import rel_err
from ..models import hunyuan_inputs, tiny_hunyuan, tiny_wan, wan_inputs
from ..reference_model import reference_attention

pytestmark = pytest.mark.gpu
pytest.importorskip("diffusers")

LATENT = (8, 32, 64)  # -> 8 x 16 x 32 = 4096 video tokens after 1x2x2 patches
GRID = (8, 16, 32)


def build(kind, batch=2, latent=LATENT):
    model = tiny_wan(heads=4, head_dim=128) if kind == "wan" else tiny_hunyuan(heads=4, head_dim=128)
    model = model.to("cuda", torch.bfloat16)
    if kind == "wan":
        inputs = wan_inputs(latent=latent, batch=batch, text_len=64, device="cuda", dtype=torch.bfloat16)
    else:
        inputs = hunyuan_inputs(latent=latent, batch=batch, text_len=64, valid=(40, 64)[:batch], device="cuda",
                                dtype=torch.bfloat16)
    return model, inputs


# Batch 1 takes the in-place attention op on sm_90 (its checks must work on Inductor's fake tensors).
@pytest.mark.parametrize("kind, text_len, n_rewritten, batch", [("wan", 0, 2, 2), ("hunyuan", 64, 4, 2),
                                                               ("wan", 0, 2, 1), ("hunyuan", 64, 4, 1)])
@torch.no_grad()
def test_inductor_bf16_matches_reference_op(kind, text_len, n_rewritten, batch):
    model, inputs = build(kind, batch)
    opt = draftopt.optimize(model, sparsity=0.9, min_tokens=0, fullgraph=True)
    got = opt(**inputs)[0]
    with reference_attention(GRID, text_len, "end", sparsity=0.9) as calls:
        want = model(**inputs)[0]
    assert len(calls) == n_rewritten == len(draftopt.report(opt).rewritten)
    assert rel_err(got, want) < 2e-2
    dense = draftopt.optimize(model, sparsity=0.0, min_tokens=0, fullgraph=True)(**inputs)[0]
    assert rel_err(dense, model(**inputs)[0]) < 2e-2


@pytest.mark.parametrize("kind", ["wan", "hunyuan"])
@torch.no_grad()
def test_reduce_overhead_cuda_graphs(kind):
    model, inputs = build(kind)
    plain = draftopt.optimize(model, sparsity=0.9, min_tokens=0, fullgraph=True)(**inputs)[0]
    opt = draftopt.optimize(model, sparsity=0.9, min_tokens=0, fullgraph=True, mode="reduce-overhead")
    for _ in range(3):  # warm-up, record, replay
        out = opt(**inputs)[0].clone()
    assert rel_err(out, plain) < 1e-2
    assert len(draftopt.report(opt).graphs) == 1


@pytest.mark.parametrize("kind", ["wan", "hunyuan"])
@torch.no_grad()
def test_fp8_attention_through_optimize(kind):
    """precision="fp8": every site runs the FP8 kernel (the report says so) and the model's output stays within
    FP8's error of the bf16 draftopt model's (an attention output is ~5% off on random inputs; the residual
    stream dilutes it at the model output)."""
    model, inputs = build(kind, batch=1)
    bf16 = draftopt.optimize(model, sparsity=0.9, min_tokens=0, fullgraph=True)(**inputs)[0]
    opt = draftopt.optimize(model, sparsity=0.9, min_tokens=0, fullgraph=True, precision="fp8")
    got = opt(**inputs)[0]
    sites = draftopt.report(opt).rewritten
    assert sites and all(s.precision == "fp8 e4m3" and s.kernel == "gluon_sm90" for s in sites)
    assert all(s.plan == "gluon_sm90, fused, e4m3 copies in, stored in place" for s in sites)  # batch 1
    assert 0 < rel_err(got, bf16) < 5e-2


PADDED_LATENT = (4, 26, 80)  # -> 4 x 13 x 40 = 2080 video tokens: 8 x 16 tiles pad 48% of the rows, strips 23%


@pytest.mark.parametrize("kind, text_len", [("wan", 0), ("hunyuan", 64)])
@torch.no_grad()
def test_default_tiling_takes_strips_on_a_padded_grid(kind, text_len):
    """optimize's default tile ("auto") at sparsity 0.9 on a grid tiles pad: every site runs raster strips (the
    report says so), matching the reference op given the same choice, in bf16 and FP8."""
    model, inputs = build(kind, batch=1, latent=PADDED_LATENT)
    opt = draftopt.optimize(model, sparsity=0.9, min_tokens=0, fullgraph=True)
    got = opt(**inputs)[0]
    sites = draftopt.report(opt).rewritten
    assert sites and all(s.layout == "strips (auto)" and s.tile == (1, 128) for s in sites)
    with reference_attention((4, 13, 40), text_len, "end", sparsity=0.9, tile="auto") as calls:
        want = model(**inputs)[0]
    assert len(calls) == len(sites)
    assert rel_err(got, want) < 2e-2
    fp8 = draftopt.optimize(model, sparsity=0.9, min_tokens=0, fullgraph=True, precision="fp8")
    got8 = fp8(**inputs)[0]
    assert all(s.precision == "fp8 e4m3" and s.layout == "strips (auto)" for s in draftopt.report(fp8).rewritten)
    assert 0 < rel_err(got8, got) < 5e-2
