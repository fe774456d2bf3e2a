"""optimize(), the backend by name, DraftConfig validation, the toy DiT with explicit attention,
dense warm-ups and the process-wide records."""

import gc
import os
import subprocess
import sys
import textwrap
from collections import deque
from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.exc import BackendCompilerFailed

import draftopt
from draftopt import backend
from draftopt.passes.config import TEXT_POSITION_CHOICES

from ..helpers import CPU_OPTIONS as OPTS
from ..models import TINY_ATTENTION_OPTIONS, TinyAttention, ToyDiT, tiny_wan, toy_inputs, wan_inputs
from ..reference_model import reference_attention


@torch.no_grad()
def test_toy_dit_explicit_attention_text_at_start():
    toy = ToyDiT().eval()
    latent, text = toy_inputs()
    want = toy(latent, text)
    model = draftopt.optimize(toy, sparsity=0.0, fullgraph=True, **OPTS)
    torch.testing.assert_close(model(latent, text), want, atol=2e-5, rtol=2e-5)
    rep = draftopt.report(model)
    assert [s.name for s in rep.rewritten] == ["blocks.0", "blocks.1"]
    for s in rep.rewritten:
        assert (s.kind, s.grid, s.text_len, s.text_position) == ("explicit", (2, 4, 8), 7, "start")
    # no softmax or matmul left in the rewritten graph
    after = rep.graphs[0].counts_after
    assert not any("softmax" in k or "matmul" in k for k in after), after


@torch.no_grad()
@pytest.mark.parametrize("latent, fuse", [((2, 16, 16), True), ((2, 16, 16), False), ((2, 14, 18), True)],
                         ids=["fused", "separate", "edge-padding"])
def test_toy_dit_sparse_matches_reference_op(latent, fuse):
    toy = ToyDiT(layers=1).eval()
    latent, text = toy_inputs(latent=latent)
    model = draftopt.optimize(toy, sparsity=0.5, fuse_permute=fuse, **OPTS)
    got = model(latent, text)
    grid = (2, latent.shape[3] // 2, latent.shape[4] // 2)
    rep = draftopt.report(model)
    rec = rep.rewritten[0]
    # fused only where the tiles cover the grid exactly (draftopt.kernels.plan, on the CPU)
    fused = fuse and grid[1] % 4 == 0 and grid[2] % 4 == 0
    assert rec.grid == grid and (rec.kernel, rec.fused, rec.in_place) == ("torch", fused, fused)
    assert rec.plan == ("torch, fused in place" if fused else "torch, separate permutes") and rec.plan in str(rep)
    attn = toy.blocks[0]
    # explicit attention = SDPA with the module's scale: route it through SDPA for the reference
    def forward_sdpa(x, self=attn):
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.out(o.transpose(1, 2).reshape(B, L, C))
    attn.forward = forward_sdpa
    with reference_attention(grid, 7, "start", sparsity=0.5, tile=(4, 4)) as calls:
        want = toy(latent, text)
    assert len(calls) == 1
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def _entry_point_installed():
    from importlib.metadata import entry_points

    return any(ep.name == "draftopt" for ep in entry_points(group="torch_dynamo_backends"))


needs_install = pytest.mark.skipif(not _entry_point_installed(),
                                   reason="draftopt is not pip-installed: the backend's entry point needs an install")


@needs_install
def test_backend_by_name_in_a_fresh_process(tmp_path):
    script = textwrap.dedent("""
        import sys, torch
        import torch.nn.functional as F

        class Attn(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.qkv = torch.nn.Linear(32, 96)
            def forward(self, x):
                B, L, _ = x.shape
                q, k, v = self.qkv(x).view(B, L, 3, 2, 16).permute(2, 0, 3, 1, 4)
                return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, 32)

        model = Attn().eval()
        x = torch.randn(1, 2 * 8 * 8, 32)
        compiled = torch.compile(model, backend="draftopt", options={
            "latent_shape": (2, 8, 8), "sparsity": 0.0, "tile": (4, 4), "min_tokens": 0, "compiler": "eager"})
        with torch.no_grad():
            out = compiled(x)
            err = (out - model(x)).abs().max().item()
        assert "draftopt" in sys.modules, "backend was not loaded through the entry point"
        import draftopt
        print("rewritten", len(draftopt.report().rewritten), "err", err)
    """)
    env = {**os.environ, "PYTHONPATH": ""}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    words = res.stdout.split()
    assert words[:2] == ["rewritten", "1"] and float(words[3]) < 1e-5, res.stdout


@needs_install
def test_backend_options_are_validated():
    model = torch.nn.Linear(4, 4)
    compiled = torch.compile(model, backend="draftopt", options={"sparsity": 1.5})
    with pytest.raises(BackendCompilerFailed,
                       match=r"ValueError: sparsity must be a number in \[0, 1\), got 1.5") as e:
        compiled(torch.randn(2, 4))
    assert isinstance(e.value.inner_exception, ValueError)
    compiled = torch.compile(model, backend="draftopt", options={"sparsty": 0.5})
    with pytest.raises(BackendCompilerFailed,
                       match=r"ValueError: unknown draftopt option\(s\) \['sparsty'\]") as e:
        compiled(torch.randn(2, 4))
    assert isinstance(e.value.inner_exception, ValueError)


@pytest.mark.parametrize("kwargs, match", [
    (dict(sparsity=1.5), r"sparsity must be a number in \[0, 1\), got 1.5"),
    (dict(policy="magic"), "unknown policy 'magic'"),
    (dict(latent_shape=(2, 16)), "latent_shape must be three positive ints"),
    (dict(tile=(3, 3)), r"tile \(3, 3\)"),
    (dict(compiler="tvm"), "compiler must be one of"),
    (dict(text_position="middle"),
     r"text_position must be one of \('auto', 'start', 'end'\) or a count >= 0 of tokens before the grid, got 'middle'"),
    (dict(text_position=-2), r"text_position must be .* got -2"),
    (dict(masked_rows="some"), r"masked_rows must be None or one of \('zero', 'nan', 'mean_v'\), got 'some'"),
    (dict(dense_layers=-1), "dense_layers"),
    (dict(patch_size=0), "patch_size"),
    (dict(warp_speed=9), r"unknown draftopt option\(s\) \['warp_speed'\]"),
])
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        draftopt.optimize(torch.nn.Linear(2, 2), **kwargs)


def test_latent_shape_not_divisible_by_patch():
    model = draftopt.optimize(tiny_wan(), latent_shape=(2, 15, 32), sparsity=0.5, **OPTS)
    # draftopt's own errors reach the user as they are, not inside Dynamo's BackendCompilerFailed
    with pytest.raises(ValueError, match=r"latent_shape \(2, 15, 32\) is not divisible by the patch size \(1, 2, 2\)"):
        with torch.no_grad():
            model(**wan_inputs(latent=(2, 15, 32)))


def test_optimize_twice_reconfigures_instead_of_stacking():
    wan = tiny_wan()
    first = draftopt.optimize(wan, sparsity=0.5, **OPTS)
    second = draftopt.optimize(first, sparsity=0.8, **OPTS)
    assert second._orig_mod is wan and second.draftopt_config.sparsity == 0.8
    with torch.no_grad():
        second(**wan_inputs())
    assert {s.sparsity for s in draftopt.report(second).rewritten} == {0.8}
    with pytest.raises(ValueError, match="already wrapped by torch.compile"):
        draftopt.optimize(torch.compile(wan))


def test_wrapper_reads_through_to_the_model():
    wan = tiny_wan()
    model = draftopt.optimize(wan, **OPTS)
    assert model.config is wan.config and model.dtype == wan.dtype
    assert model.state_dict().keys() == {f"_orig_mod.{k}" for k in wan.state_dict()}


def test_report_and_dense_reject_other_models():
    with pytest.raises(ValueError, match="draftopt.optimize"):
        draftopt.report(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="draftopt.optimize"):
        with draftopt.dense(torch.nn.Linear(2, 2)):
            pass


def test_report_before_the_first_call():
    model = draftopt.optimize(torch.nn.Linear(2, 2), **OPTS)
    assert "no graph compiled yet" in str(draftopt.report(model))


def test_call_with_grad_enabled_raises_one_clear_error():
    """Grad enabled (parameters require grad): one line at the first call, not a BackendCompilerFailed."""
    model = draftopt.optimize(tiny_wan(), sparsity=0.5, **OPTS)
    with pytest.raises(draftopt.backend.InferenceOnlyError, match=r"draftopt is inference-only .* torch.no_grad\(\)"):
        model(**wan_inputs())
    with torch.no_grad():
        model(**wan_inputs())  # and under no_grad it runs


def test_backend_by_name_with_grad_enabled_names_the_fix():
    compiled = torch.compile(tiny_wan(), backend="draftopt", options=dict(OPTS, latent_shape=(2, 16, 32)))
    with pytest.raises(BackendCompilerFailed, match=r"draftopt is inference-only") as e:
        compiled(**wan_inputs())
    assert isinstance(e.value.inner_exception, draftopt.backend.InferenceOnlyError)


@pytest.mark.parametrize("position", TEXT_POSITION_CHOICES)
def test_text_position_choices(position):
    assert TEXT_POSITION_CHOICES == ("auto", "start", "end")
    assert draftopt.DraftConfig(text_position=position).text_position == position


# -- dense warm-ups ------------------------------------------------------------------------------
@pytest.fixture
def tiny():
    """(model, optimized model, input): one SDPA layer, sparsity 0.9 (far from dense), eager."""
    model = TinyAttention().eval()
    return model, draftopt.optimize(model, sparsity=0.9, **TINY_ATTENTION_OPTIONS), TinyAttention.inputs()


def runs_dense(tiny) -> bool:
    model, optimized, x = tiny
    with torch.no_grad():
        out, dense = optimized(x), model(x)
    if torch.allclose(out, dense, atol=1e-5, rtol=1e-5):
        return True
    assert (out - dense).abs().max() > 1e-2, "neither dense nor clearly sparse"
    return False


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_dense_warmup_ends_when_a_dense_step_raises(tiny, error):
    """An interrupted pipeline (Ctrl-C, an error in a step) must not leave the model dense for good."""
    model, optimized, x = tiny
    warmup = draftopt.DenseWarmup(optimized, steps=10)
    assert warmup.active and runs_dense(tiny)
    model.fail_with = error
    with pytest.raises(error, match="interrupted"), torch.no_grad():
        optimized(x)
    model.fail_with = None
    assert not warmup.active and not runs_dense(tiny)


def test_dense_warmup_close_is_idempotent(tiny):
    warmup = draftopt.DenseWarmup(tiny[1], steps=10)
    assert runs_dense(tiny)
    warmup.close()
    assert not warmup.active and not runs_dense(tiny)
    warmup.close()
    warmup(None, 0, 0, {})  # a callback after close changes nothing
    assert not runs_dense(tiny)


def test_dense_warmup_as_a_context_manager(tiny):
    with draftopt.DenseWarmup(tiny[1], steps=10) as warmup:
        assert warmup.active and runs_dense(tiny)
    assert not warmup.active and not runs_dense(tiny)
    with pytest.raises(KeyError, match="stop"):
        with draftopt.DenseWarmup(tiny[1], steps=10):
            raise KeyError("stop")
    assert not runs_dense(tiny)


def test_dense_warmup_dropped_unfinished(tiny):
    warmup = draftopt.DenseWarmup(tiny[1], steps=10)
    assert runs_dense(tiny)
    del warmup
    gc.collect()
    assert not runs_dense(tiny)


def test_dense_warmups_nest_with_dense(tiny):
    first, second = draftopt.DenseWarmup(tiny[1], steps=10), draftopt.DenseWarmup(tiny[1], steps=10)
    first.close()
    assert runs_dense(tiny)  # the second is still on
    with draftopt.dense(tiny[1]):
        second.close()
        assert runs_dense(tiny)
    assert not runs_dense(tiny)
    assert not draftopt.DenseWarmup(tiny[1], steps=0).active and not runs_dense(tiny)


def test_dense_warmup_ends_at_the_pipelines_last_step(tiny):
    """More warm-up steps than the pipeline runs: dense until its last step (``pipe.num_timesteps``)."""
    warmup = draftopt.DenseWarmup(tiny[1], steps=50)
    pipe = SimpleNamespace(num_timesteps=3)
    for step in range(3):
        assert warmup.active and runs_dense(tiny)
        assert warmup(pipe, step, 999 - step, {"latents": step}) == {"latents": step}
    assert not warmup.active and not runs_dense(tiny)


# -- the process-wide records --------------------------------------------------------------------
def test_reset_empties_the_process_report():
    draftopt.reset()
    assert "no graph compiled yet" in str(draftopt.report())
    model = TinyAttention().eval()
    optimized = draftopt.optimize(model, sparsity=0.5, capture_masks=True, **TINY_ATTENTION_OPTIONS)
    with torch.no_grad():
        optimized(TinyAttention.inputs())
    assert len(draftopt.report().graphs) == 1 and len(draftopt.report().rewritten) == 1
    assert list(draftopt.captured_masks()) == ["scaled_dot_product_attention"]
    draftopt.reset()
    assert not draftopt.report().graphs and "no graph compiled yet" in str(draftopt.report())
    assert draftopt.captured_masks() == {}
    assert len(draftopt.report(optimized).graphs) == 1  # a model keeps its own records


def test_process_report_keeps_the_newest_graphs(monkeypatch):
    assert backend.GRAPHS.maxlen == backend.MAX_GRAPHS
    monkeypatch.setattr(backend, "GRAPHS", deque(maxlen=2))
    for batch in (1, 2, 3):  # static shapes: one graph per batch size
        optimized = draftopt.optimize(TinyAttention().eval(), sparsity=0.5, **TINY_ATTENTION_OPTIONS)
        with torch.no_grad():
            optimized(TinyAttention.inputs(batch))
    graphs = draftopt.report().graphs
    assert [g.sites[0].q_shape[0] for g in graphs] == [2, 3]


def test_graph_flops_are_counted_when_a_report_asks(tiny):
    with torch.no_grad():
        tiny[1](tiny[2])
    (graph,) = draftopt.report(tiny[1]).graphs
    assert graph.flops_total is None and graph.count_flops is not None  # nothing counted while compiling
    assert "GFLOP" in str(draftopt.report(tiny[1]))
    assert graph.flops_total > 0 and graph.count_flops is None and not graph.flops_error
