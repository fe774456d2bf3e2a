"""The ``draftopt`` torch.compile backend.

Found by name through the ``torch_dynamo_backends`` entry point, so
``torch.compile(model, backend="draftopt", options={...})`` works without
importing draftopt. ``options`` takes DraftConfig's fields; ``mode`` is passed
on to Inductor (``"reduce-overhead"``: CUDA graphs).
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch._logging import trace_structured

from .passes import DraftAttentionPass
from .config import DraftConfig
from .report import GraphRecord, Report, op_counts, site_flops

log = logging.getLogger(__name__)

# Every graph the backend compiled in this process (draftopt.report() with no model).
GRAPHS: list[GraphRecord] = []


def draftopt_backend(gm: torch.fx.GraphModule, example_inputs, options=None, mode=None, records=None):
    """Rewrite the graph's video self-attention, then compile it with ``config.compiler``."""
    config = DraftConfig.from_options(options)
    record = GraphRecord(index=len(GRAPHS), counts_before=op_counts(gm.graph), code_before=gm.code,
                         config=dataclasses.asdict(config))
    other_flops = graph_flops_without_sdpa(gm, example_inputs)
    record.sites = DraftAttentionPass(config)(gm, example_inputs)
    if other_flops is not None:  # SDPA with our estimate: the counter misses SDPA's CPU kernels
        record.flops_total = other_flops + sum(site_flops(s)[0] or 0 for s in record.sites if s.kind == "sdpa")
    record.counts_after, record.code_after = op_counts(gm.graph), gm.code
    GRAPHS.append(record)
    if records is not None:
        records.append(record)
    rewritten = sum(s.status == "rewritten" for s in record.sites)
    log.info("draftopt: graph %d: %d attention sites, %d rewritten", record.index, len(record.sites), rewritten)
    # Next to Inductor's own artifacts for TORCH_TRACE / tlparse users.
    trace_structured("artifact", metadata_fn=lambda: {"name": "draftopt_report", "encoding": "json"},
                     payload_fn=lambda: Report([record]).to_json())
    return compile_graph(gm, example_inputs, config.compiler, mode)


def graph_flops_without_sdpa(gm: torch.fx.GraphModule, example_inputs) -> int | None:
    """FLOPs of one run of the graph except its SDPA calls, counted on fake tensors; None if unknown."""
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    try:
        fake_mode = detect_fake_mode(example_inputs) or FakeTensorMode(allow_non_fake_inputs=True)
        with fake_mode:
            inputs = [fake_mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]
            with FlopCounterMode(display=False) as counter:
                gm(*inputs)
        counts = counter.get_flop_counts().get("Global", {})
        return sum(f for op, f in counts.items() if "scaled_dot_product" not in str(op))
    except Exception as e:  # a report figure must never break compilation
        log.debug("draftopt: could not count graph FLOPs: %s", e)
        return None


def compile_graph(gm, example_inputs, compiler: str, mode: str | None = None):
    if compiler == "eager":
        return gm.forward
    if compiler == "aot_eager":
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches=list_mode_options(mode) if mode else {})
