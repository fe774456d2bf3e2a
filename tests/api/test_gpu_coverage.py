"""GPU-only: the coverage paths at bf16 on the GPU kernels: the diffusers attention backend (eager, compiled,
CUDA graphs), HunyuanVideo 1.5's query x key padding mask, FramePack's text on both sides of the grid."""

import pytest
import torch

import draftopt

from ..helpers import rel_err
from ..models import (framepack_inputs, hunyuan15_inputs, hunyuan_inputs, tiny_framepack, tiny_hunyuan,
                      tiny_hunyuan15, tiny_wan, wan_inputs)
from ..reference_model import reference_attention

pytestmark = pytest.mark.gpu
pytest.importorskip("diffusers")

LATENT, GRID = (4, 32, 64), (4, 16, 32)  # 2048 video tokens in 128-token tiles after 1x2x2 patches


def _cuda(inputs):
    return {k: v.to("cuda", torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else
            v.to("cuda") if torch.is_tensor(v) else v for k, v in inputs.items()}


def build(kind):
    if kind == "wan":
        return tiny_wan(heads=2, head_dim=128).to("cuda", torch.bfloat16), _cuda(wan_inputs(LATENT, text_len=32)), 0
    model = tiny_hunyuan(heads=2, head_dim=128, layers=1, single_layers=1).to("cuda", torch.bfloat16)
    return model, _cuda(hunyuan_inputs(LATENT, batch=1, text_len=32, valid=(20,))), 32


@pytest.mark.parametrize("kind", ["wan", "hunyuan"])
@pytest.mark.parametrize("how", ["eager", "compiled", "cuda-graphs"])
@torch.no_grad()
def test_diffusers_backend_on_the_gpu_matches_the_reference_op(kind, how):
    model, inputs, text_len = build(kind)
    with reference_attention(GRID, text_len, "end", sparsity=0.9) as calls:
        want = model(**inputs)[0]
    handle = draftopt.use_attention_backend(model, sparsity=0.9, min_tokens=0)
    run = model
    if how != "eager":
        run = torch.compile(model, mode="reduce-overhead" if how == "cuda-graphs" else None)
    for _ in range(3 if how == "cuda-graphs" else 1):  # warm-up, record, replay
        got = run(**inputs)[0].clone()
    assert len(draftopt.report(model).rewritten) == len(calls) > 0
    assert all(s.kernel == "gluon_sm90" for s in draftopt.report(model).rewritten)
    assert rel_err(got, want) < 2e-2
    handle.remove()


@torch.no_grad()
def test_hunyuan15_outer_product_mask_on_the_gpu():
    """The query x key padding mask at bf16 on the GPU. cuDNN (SDPA's pick for a 16-bit masked call on an
    H200, torch 2.11) leaves fully masked query rows undefined (neither 0, NaN nor the mean of v: probed
    2026-12-01), so by default the site stays dense, saying what to pass. With masked_rows="zero" it is
    rewritten, and the model's output still matches the original at sparsity 0: those rows are padding that
    no valid token reads."""
    model = tiny_hunyuan15(heads=2, head_dim=128).to("cuda", torch.bfloat16)
    inputs = _cuda(hunyuan15_inputs(latent=(2, 16, 32)))
    want = model(**inputs)[0]
    default = draftopt.optimize(model, latent_shape=(2, 16, 32), sparsity=0.0, min_tokens=0)
    assert rel_err(default(**inputs)[0], want) < 2e-2
    site = [s for s in draftopt.report(default).sites if s.candidate][0]
    assert site.status == "skipped" and "masked_rows='zero'" in site.reason, site.reason
    dense = draftopt.optimize(default, masked_rows="zero")
    assert rel_err(dense(**inputs)[0], want) < 2e-2
    (site,) = draftopt.report(dense).rewritten
    assert site.mask_form == "query x key padding (masked rows: zero, by masked_rows)"
    assert site.kernel == "gluon_sm90"
    sparse = draftopt.optimize(dense, sparsity=0.9)(**inputs)[0]  # reconfigured: the same latent_shape
    assert torch.isfinite(sparse).all() and 1e-3 < rel_err(sparse, want) < 0.5


@torch.no_grad()
def test_framepack_text_on_both_sides_on_the_gpu():
    """aot_eager: Inductor (torch 2.11, CUDA, bf16) fails on FramePack's own code with or without draftopt
    ("The argument '2*(ModularIndexing((0), 1, 16)) + 1' is not comparable", plain torch.compile, 2026-12-01);
    the draftopt ops still run their GPU kernels."""
    model = tiny_framepack(heads=2, head_dim=128).to("cuda", torch.bfloat16)
    inputs = _cuda(framepack_inputs(latent=(2, 32, 64)))
    opt = draftopt.optimize(model, latent_shape=(2, 32, 64), sparsity=0.9, min_tokens=0, compiler="aot_eager")
    got = opt(**inputs)[0]
    rewritten = draftopt.report(opt).rewritten
    history = 1 * 16 * 32 + 1 * 8 * 16 + 1 * 4 * 8  # the clean frame, 2 frames at 2x, 4 at 4x
    assert [(s.text_len, s.text_position, s.kernel) for s in rewritten] == [(history + 11, history, "gluon_sm90")] * 2
    with reference_attention((2, 16, 32), history + 11, history, sparsity=0.9) as calls:
        want = model(**inputs)[0]
    assert len(calls) == len(rewritten) == 2
    assert rel_err(got, want) < 2e-2
