"""The ``draftopt`` torch.compile backend.

Found by name through the ``torch_dynamo_backends`` entry point, so
``torch.compile(model, backend="draftopt", options={...})`` works without
importing draftopt. ``options`` takes DraftConfig's fields; ``mode`` is passed
on to Inductor (``"reduce-overhead"``: CUDA graphs).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import warnings
from collections import Counter, deque
from typing import NamedTuple

import torch
import torch.fx as fx
from torch._logging import trace_structured

from .kernels.dispatch import FP8_NAME
from .passes import DraftAttentionPass, DraftConfig, ModelContext, find_attention_sites
from .passes.infer_geometry import is_static
from .passes.sites import example_value
from .report import GraphRecord, Report, op_counts

log = logging.getLogger(__name__)

# The newest graphs the backend compiled in this process (draftopt.report() with no model);
# draftopt.reset() clears them.
MAX_GRAPHS = 256
GRAPHS: deque[GraphRecord] = deque(maxlen=MAX_GRAPHS)
_INDEX = itertools.count()


class DraftoptWarning(UserWarning):
    """Video self-attention that draftopt left dense (``optimize(..., strict=True)`` raises instead)."""


class DenseSitesError(RuntimeError):
    """``strict=True``: a compiled graph has video self-attention that draftopt could not rewrite."""


class InferenceOnlyError(RuntimeError):
    """draftopt's ops have no backward: the model was called with gradients enabled."""


def reset() -> None:
    """Forget every graph recorded so far (``draftopt.report()`` starts empty again)."""
    GRAPHS.clear()


def draftopt_backend(gm: torch.fx.GraphModule, example_inputs, options=None, mode=None, records=None,
                     context: ModelContext | None = None):
    """Rewrite the graph's video self-attention, then compile it with ``config.compiler``.

    ``context``: what ``draftopt.optimize`` knows beyond the graph (the patch size
    of ``model.config``, the run-time control of ``runtime_sparsity``).

    A graph that Dynamo traced with dynamic shapes (``torch.compile``'s default
    makes a second resolution dynamic) has no concrete geometry; such a graph
    is compiled once per input shape instead, each copy with its own geometry
    (dense graphs too: their records and report then hold concrete shapes).
    """
    config = DraftConfig.from_options(options)
    if config.enabled and torch.is_grad_enabled() and any(
            isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs):
        raise InferenceOnlyError(INFERENCE_ONLY)
    if _symbolic_sites(gm):
        return _PerShape(gm, config, mode, records, context)
    return _compile_static(gm, example_inputs, config, mode, records, context)


def _compile_static(gm: fx.GraphModule, example_inputs, config: DraftConfig, mode, records, context=None):
    record = GraphRecord(index=next(_INDEX), counts_before=op_counts(gm.graph), code_before=gm.code,
                         config=dataclasses.asdict(config))
    record.count_flops = flop_counter(gm, example_inputs)  # run when a report asks for it
    original = _copy(gm)  # the pass rewrites gm in place
    record.sites = DraftAttentionPass(config, context or ModelContext())(gm, example_inputs)
    record.counts_after, record.code_after = op_counts(gm.graph), gm.code
    GRAPHS.append(record)
    if records is not None:
        records.append(record)
    rewritten = sum(s.status == "rewritten" for s in record.sites)
    log.info("draftopt: graph %d: %d attention sites, %d rewritten", record.index, len(record.sites), rewritten)
    _tell_dense(record, config.strict)
    _tell_precision(record, config.precision)
    # Next to Inductor's own artifacts for TORCH_TRACE / tlparse users.
    trace_structured("artifact", metadata_fn=lambda: {"name": "draftopt_report", "encoding": "json"},
                     payload_fn=lambda: Report([record]).to_json())
    if not rewritten:
        return compile_graph(gm, example_inputs, config.compiler, mode)
    try:
        return compile_graph(gm, example_inputs, config.compiler, mode)
    except Exception as e:  # never Dynamo's silent eager fallback: say it, and run the original graph
        _tell_compile_failed(record, e, config.strict)
        return compile_graph(original, example_inputs, config.compiler, mode)


def _tell_compile_failed(record: GraphRecord, error: Exception, strict: bool) -> None:
    why = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
    for s in record.sites:
        if s.status == "rewritten":
            s.status, s.reason, s.candidate = "skipped", f"compiling the rewritten graph failed ({why})", True
    message = (f"draftopt: compiling graph {record.index} with its draft-attention sites failed ({why}); the "
               "graph runs as it was, dense. This is a draftopt bug: please report it with the traceback "
               "that strict=True raises.")
    if strict:
        raise DenseSitesError(message) from error
    warnings.warn(message, DraftoptWarning, stacklevel=2)


def _symbolic_sites(gm: fx.GraphModule) -> bool:
    """Whether an attention site's q has a symbolic shape (Dynamo traced the graph dynamic)."""
    values = (example_value(site.q) for site in find_attention_sites(gm.graph))
    return any(v is not None and not is_static(v.shape) for v in values)


class _PerShape:
    """A dynamic graph compiled per concrete input shape: each resolution gets a static copy of the graph
    (metadata re-propagated on fake tensors of that shape), rewritten with its own geometry."""

    def __init__(self, gm, config, mode, records, context=None):
        self.gm, self.config, self.mode, self.records, self.context = gm, config, mode, records, context
        self.compiled = {}

    def __call__(self, *args):
        key = tuple((tuple(a.shape), a.stride(), a.dtype, a.device) if isinstance(a, torch.Tensor) else a
                    for a in args)
        fn = self.compiled.get(key)
        if fn is None:
            static = _specialized(self.gm, args)
            fn = self.compiled[key] = _compile_static(static, list(args), self.config, self.mode, self.records,
                                                      self.context)
        return fn(*args)


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of the graph (nodes and their metadata dicts) sharing the module's attributes."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return fx.GraphModule(gm, graph)


def _specialized(gm: fx.GraphModule, args) -> fx.GraphModule:
    """A copy of ``gm`` whose node metadata are the shapes of a run on ``args`` (fake tensors, no compute)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    copy = _copy(gm)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    FakeTensorProp(copy, mode).propagate_dont_convert_inputs(*fakes)
    for n in copy.graph.nodes:
        if "val" in n.meta:
            n.meta["example_value"] = n.meta["val"]
    return copy


INFERENCE_ONLY = ("draftopt is inference-only (its ops have no backward): call the model under torch.no_grad() "
                  "or torch.inference_mode(), as diffusers pipelines do")


def _tell_dense(record: GraphRecord, strict: bool) -> None:
    """One warning per graph (strict: an error) when video self-attention stayed dense, with the reasons."""
    dense = [s for s in record.sites if s.status != "rewritten" and s.candidate]
    if not dense:
        return
    candidates = sum(s.candidate or s.status == "rewritten" for s in record.sites)
    rewritten = candidates - len(dense)
    reasons = "; ".join(f"{n} x {why}" if n > 1 else why for why, n in Counter(s.reason for s in dense).items())
    message = (f"draftopt: {rewritten} of {candidates} video self-attention sites rewritten in graph "
               f"{record.index}, the others stay dense: {reasons}. draftopt.report(model) lists every site.")
    if strict:
        raise DenseSitesError(message + " (strict=True)")
    warnings.warn(message, DraftoptWarning, stacklevel=2)


def precision_shortfall(sites, precision: str | None) -> str:
    """Why rewritten ``sites`` do not all compute in the asked-for precision ("" where they do)."""
    plain = [s for s in sites if s.status == "rewritten" and precision == "fp8" and s.precision != FP8_NAME]
    if not plain:
        return ""
    return (f"precision='fp8' was asked for, but {len(plain)} rewritten site(s) compute in {plain[0].precision}: "
            f"{plain[0].kernel_reason}")


def _tell_precision(record: GraphRecord, precision: str | None) -> None:
    """One warning per graph when precision="fp8" was asked for and a rewritten site computes in its dtype."""
    why = precision_shortfall(record.sites, precision)
    if why:
        warnings.warn(f"draftopt: graph {record.index}: {why}", DraftoptWarning, stacklevel=2)


class _TensorSpec(NamedTuple):
    shape: tuple
    stride: tuple
    dtype: torch.dtype
    device: torch.device


def flop_counter(gm: fx.GraphModule, example_inputs):
    """A function that counts one run of the graph as it is now (before the rewrite), on fake tensors.

    It keeps a copy of the graph (sharing the module's attributes) and the
    inputs' shapes only, so nothing runs and no input stays alive until a
    report asks. It returns the FLOPs of every op except SDPA (whose CPU kernels
    the counter misses; the report adds its own estimate for those sites).
    """
    copy = _copy(gm)
    specs = [_TensorSpec(tuple(x.shape), x.stride(), x.dtype, x.device) if isinstance(x, torch.Tensor) else x
             for x in example_inputs]

    def count() -> int:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.utils.flop_counter import FlopCounterMode

        with FakeTensorMode(allow_non_fake_inputs=True):
            inputs = [torch.empty_strided(s.shape, s.stride, dtype=s.dtype, device=s.device)
                      if isinstance(s, _TensorSpec) else s for s in specs]
            with FlopCounterMode(display=False) as counter:
                copy(*inputs)
        counts = counter.get_flop_counts().get("Global", {})
        return sum(f for op, f in counts.items() if "scaled_dot_product" not in str(op))

    return count


def compile_graph(gm, example_inputs, compiler: str, mode: str | None = None):
    if compiler == "eager":
        return gm.forward
    if compiler == "aot_eager":
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches=list_mode_options(mode) if mode else {})
