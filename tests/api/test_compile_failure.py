"""A rewritten graph that fails to compile never falls back silently (Dynamo would run it eagerly and dense
with only a log line): draftopt warns, runs the original graph, and the report says why; strict raises."""

import pytest
import torch

import draftopt
from draftopt import backend

from ..helpers import CPU_OPTIONS
from ..models import ToyDiT, toy_inputs

LATENT = (2, 8, 16)


def failing_first_compile(monkeypatch):
    real, calls = backend.compile_graph, []

    def compile_graph(gm, *args, **kwargs):
        calls.append(gm)
        if any(str(n.target).startswith("draftopt.") for n in gm.graph.nodes):
            raise RuntimeError("planted failure")
        return real(gm, *args, **kwargs)

    monkeypatch.setattr(backend, "compile_graph", compile_graph)
    return calls


def test_failed_compile_warns_and_runs_the_original(monkeypatch):
    failing_first_compile(monkeypatch)
    torch.manual_seed(0)
    model = ToyDiT().eval()
    opt = draftopt.optimize(model, latent_shape=LATENT, sparsity=0.9, **CPU_OPTIONS)
    inputs = toy_inputs(latent=LATENT)
    with pytest.warns(draftopt.backend.DraftoptWarning, match="planted failure.*runs as it was, dense"):
        with torch.no_grad():
            out = opt(*inputs)
    with torch.no_grad():
        torch.testing.assert_close(out, model(*inputs))
    sites = draftopt.report(opt).sites
    assert sites and all(s.status == "skipped" and "compiling the rewritten graph failed" in s.reason for s in sites)


def test_failed_compile_raises_under_strict(monkeypatch):
    failing_first_compile(monkeypatch)
    opt = draftopt.optimize(ToyDiT().eval(), latent_shape=LATENT, sparsity=0.9, strict=True, **CPU_OPTIONS)
    with pytest.raises(backend.DenseSitesError, match="planted failure"):
        with torch.no_grad():
            opt(*toy_inputs(latent=LATENT))


def test_every_compiler_runs_the_sparse_graph():
    """The rewritten graph is what runs, with each compiler (it once failed to trace under AOTAutograd and
    Dynamo ran the model dense): outputs differ from the dense model's and agree across compilers."""
    torch.manual_seed(0)
    model = ToyDiT().eval()
    inputs = toy_inputs(latent=LATENT)
    outs = {}
    for compiler in ("eager", "aot_eager", "inductor"):
        opts = dict(CPU_OPTIONS, compiler=compiler)
        opt = draftopt.optimize(model, latent_shape=LATENT, sparsity=0.9, strict=True, **opts)
        with torch.no_grad():
            outs[compiler] = opt(*inputs)
    with torch.no_grad():
        dense = model(*inputs)
    assert (outs["eager"] - dense).abs().max() > 1e-3
    torch.testing.assert_close(outs["aot_eager"], outs["eager"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["inductor"], outs["eager"], atol=1e-4, rtol=1e-4)
