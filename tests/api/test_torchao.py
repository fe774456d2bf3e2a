"""draftopt with torchao's quantized linears in the same model (issue 17, target 4: FP8 linears on the GPU;
on the CPU torchao quantizes to int8, the same tensor-subclass weights and activation quantization)."""

import pytest
import torch

import draftopt

from ..helpers import CPU_OPTIONS, rel_err
from ..models import tiny_wan, wan_inputs

quantization = pytest.importorskip("torchao.quantization")


def quantized_wan(config):
    model = tiny_wan()
    quantization.quantize_(model, config)
    return model


@torch.no_grad()
def test_weight_only_quantized_model_is_rewritten_exactly():
    model, inputs = quantized_wan(quantization.Int8WeightOnlyConfig()), wan_inputs()
    assert type(model.blocks[0].attn1.to_q.weight).__name__ != "Parameter"  # a torchao tensor subclass
    want = model(**inputs)[0]
    optimized = draftopt.optimize(model, sparsity=0.0, **CPU_OPTIONS)
    torch.testing.assert_close(optimized(**inputs)[0], want, atol=2e-5, rtol=2e-5)
    assert [s.name for s in draftopt.report(optimized).rewritten] == ["blocks.0.attn1", "blocks.1.attn1"]


@torch.no_grad()
def test_dynamically_quantized_activations_still_find_every_site():
    """Activations quantized at run time (as torchao's float8 dynamic config does on the GPU): the sites are
    found and rewritten; at sparsity 0 the output is the quantized model's up to int8 rounding of the
    attention output (a last-bit change in fp32 moves an int8 step of the next linear)."""
    model, inputs = quantized_wan(quantization.Int8DynamicActivationInt8WeightConfig()), wan_inputs()
    want = torch.compile(model, backend="aot_eager", dynamic=False)(**inputs)[0]
    optimized = draftopt.optimize(model, sparsity=0.0, **CPU_OPTIONS)
    got = optimized(**inputs)[0]
    assert len(draftopt.report(optimized).rewritten) == 2
    assert rel_err(got, want) < 2e-2
