"""diffusers hooks around the blocks (issue 15 item 1): layerwise fp8 weight casting, group offloading, First
Block Cache. Their hooks break Dynamo's graph before the blocks, so no graph shows the patch embedding: the
site says to pass latent_shape, and with it the blocks are rewritten, exact at sparsity 0."""

import contextlib

import pytest
import torch

import draftopt

from ..helpers import CPU_OPTIONS
from ..models import tiny_wan, wan_inputs

pytest.importorskip("diffusers")


def layerwise(model):
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)


def group_offload(model):
    cpu = torch.device("cpu")
    model.enable_group_offload(onload_device=cpu, offload_device=cpu, offload_type="block_level",
                               num_blocks_per_group=1)


def first_block_cache(model):
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    apply_first_block_cache(model, FirstBlockCacheConfig(threshold=0.0))


@pytest.mark.parametrize("hook", [layerwise, group_offload, first_block_cache], ids=lambda f: f.__name__)
@torch.no_grad()
def test_hooked_model_is_rewritten_with_latent_shape(hook):
    model, inputs = tiny_wan(), wan_inputs()
    hook(model)
    cached = hook is first_block_cache  # its hooks need a cache context per call

    def call(m, name):
        with model.cache_context(name) if cached else contextlib.nullcontext():
            return m(**inputs)[0]

    want = call(model, "original")
    if hook is layerwise:  # without latent_shape: dense, saying what to pass
        plain = draftopt.optimize(model, sparsity=0.0, **CPU_OPTIONS)
        call(plain, "plain")
        assert any(s.reason.startswith("no geometry: pass latent_shape") for s in draftopt.report(plain).skipped)
    optimized = draftopt.optimize(model, latent_shape=(2, 16, 32), sparsity=0.0, **CPU_OPTIONS)
    torch.testing.assert_close(call(optimized, "optimized"), want, atol=2e-5, rtol=2e-5)
    rewritten = draftopt.report(optimized).rewritten
    assert rewritten and all(s.grid == (2, 8, 16) for s in rewritten)
    assert not [s for s in draftopt.report(optimized).skipped if s.candidate]
