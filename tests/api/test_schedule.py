"""Run-time sparsity (optimize(..., runtime_sparsity=True)): set_sparsity / SparsitySchedule change the
selection between calls without recompiling; the guard (max_error) widens heads in a compiled model."""

import pytest
import torch

import draftopt
from draftopt.schedule import SparsitySchedule, set_sparsity

from ..helpers import CPU_OPTIONS
from ..models import ToyDiT, toy_inputs

LATENT = (2, 8, 16)


@pytest.fixture(scope="module")
def runtime_model():
    torch.manual_seed(0)
    model = ToyDiT().eval()
    opt = draftopt.optimize(model, latent_shape=LATENT, sparsity=0.9, runtime_sparsity=True,
                            capture_masks=True, **CPU_OPTIONS)
    return model, opt, toy_inputs(latent=LATENT)


def kept_fractions(opt, inputs):
    draftopt.captured_masks(clear=True)
    with torch.no_grad():
        out = opt(*inputs)
    masks = [m for ms in draftopt.captured_masks(clear=True).values() for m in ms]
    return out, [round(m.density(), 3) for m in masks]


def test_sparsity_changes_between_calls_without_recompiling(runtime_model):
    model, opt, inputs = runtime_model
    _, at_09 = kept_fractions(opt, inputs)
    graphs = len(opt._draftopt_records)
    set_sparsity(opt, 0.5)
    _, at_05 = kept_fractions(opt, inputs)
    set_sparsity(opt, 0.0)
    out, at_0 = kept_fractions(opt, inputs)
    assert len(opt._draftopt_records) == graphs, "a new sparsity must not compile a new graph"
    assert all(a < b for a, b in zip(at_09, at_05)) and all(d == 1.0 for d in at_0)
    with torch.no_grad():  # sparsity 0 keeps every pair: the original model's output
        torch.testing.assert_close(out, model(*inputs), atol=2e-5, rtol=2e-5)
    set_sparsity(opt, 0.9)


def test_schedule_as_a_step_callback(runtime_model):
    _, opt, inputs = runtime_model
    schedule = SparsitySchedule(opt, [0.0, 0.5, 0.9])
    densities = []
    for step in range(4):
        densities.append(kept_fractions(opt, inputs)[1][0])
        schedule(None, step, None, {})  # what a diffusers pipeline calls after each step
    assert densities[0] == 1.0 and densities[0] > densities[1] > densities[2] == densities[3]


@pytest.fixture(scope="module")
def guarded_model():
    """A model compiled once with the guard (max_error 0.02 at sparsity 0.95), and its inputs."""
    torch.manual_seed(1)
    opt = draftopt.optimize(ToyDiT().eval(), latent_shape=LATENT, sparsity=0.95, max_error=0.02,
                            capture_masks=True, **CPU_OPTIONS)
    return opt, toy_inputs(latent=LATENT)


def run_capturing(opt, inputs) -> list:
    """One call with an empty mask store; the masks it recorded (left in the store for the report)."""
    draftopt.captured_masks(clear=True)
    with torch.no_grad():
        opt(*inputs)
    return [m for ms in draftopt.captured_masks().values() for m in ms]


def test_guard_in_a_compiled_model_bounds_the_estimated_error(guarded_model):
    masks = run_capturing(*guarded_model)
    draftopt.captured_masks(clear=True)
    assert masks and all((m.estimated_error() <= 0.02 + 1e-6).all() for m in masks)
    assert any(m.widened().any() for m in masks)


def test_set_sparsity_needs_runtime_sparsity():
    opt = draftopt.optimize(ToyDiT().eval(), latent_shape=LATENT, **CPU_OPTIONS)
    with pytest.raises(RuntimeError, match="runtime_sparsity=True"):
        set_sparsity(opt, 0.5)
    with pytest.raises(ValueError, match="draftopt.optimize"):
        set_sparsity(ToyDiT(), 0.5)


def test_bad_schedules(runtime_model):
    _, opt, _ = runtime_model
    with pytest.raises(ValueError, match="empty"):
        SparsitySchedule(opt, [])
    with pytest.raises(ValueError, match=r"schedule\[1\] must be a sparsity"):
        SparsitySchedule(opt, [0.5, 1.2])
    with pytest.raises(ValueError, match="sparsity must be"):
        set_sparsity(opt, -0.1)


def test_report_shows_what_each_head_kept_and_the_guard_widened(guarded_model):
    opt, inputs = guarded_model
    assert run_capturing(opt, inputs)
    text = str(draftopt.report(opt))
    assert "Captured masks" in text and "heads widened by the guard" in text
    row = next(line for line in text.splitlines() if line.startswith("blocks.0"))
    widened = int(row.split()[-3])  # "... N of M"
    assert widened >= 1 and "mass" in row
    draftopt.captured_masks(clear=True)
