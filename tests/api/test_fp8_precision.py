"""precision="fp8" through the entry points on the CPU (the PyTorch path simulates FP8): optimize, the diffusers
attention backend and the export, which refuses it. The Gluon kernel's FP8: tests/kernels/test_fp8.py and
tests/api/test_gpu_models.py."""

import pytest
import torch

import draftopt

from ..helpers import CPU_OPTIONS, rel_err
from ..models import tiny_wan, wan_inputs

pytest.importorskip("diffusers")


@torch.no_grad()
def test_optimize_runs_fp8_and_reports_it():
    model, inputs = tiny_wan(), wan_inputs()
    want = model(**inputs)[0]
    optimized = draftopt.optimize(model, sparsity=0.0, precision="fp8", **CPU_OPTIONS)
    got = optimized(**inputs)[0]
    assert 1e-4 < rel_err(got, want) < 2e-2  # quantized, and only by e4m3's rounding of the attention
    rep = draftopt.report(optimized)
    assert [s.precision for s in rep.rewritten] == ["fp8 e4m3"] * 2
    assert all(s.precision == "" and s.dtype == "float32" for s in rep.skipped)
    table = str(rep)
    assert "precision" in table and "fp8 e4m3" in table


@torch.no_grad()
def test_diffusers_backend_runs_fp8():
    model, inputs = tiny_wan(layers=1), wan_inputs()
    want = model(**inputs)[0]
    handle = draftopt.use_attention_backend(model, sparsity=0.0, precision="fp8", tile=(4, 4), min_tokens=0)
    try:
        got = model(**inputs)[0]
    finally:
        handle.remove()
    assert 1e-4 < rel_err(got, want) < 2e-2
    assert [s.precision for s in draftopt.report(model).rewritten] == ["fp8 e4m3"]


def test_export_refuses_fp8():
    model, inputs = tiny_wan(layers=1), wan_inputs()
    with pytest.raises(ValueError, match="precision='fp8' is not supported by draftopt's export"):
        draftopt.export_program(model, example_kwargs=inputs, sparsity=0.5, precision="fp8", **CPU_OPTIONS)
