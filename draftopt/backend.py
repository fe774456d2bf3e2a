"""The ``draftopt`` torch.compile backend.

Found by name through the ``torch_dynamo_backends`` entry point, so
``torch.compile(model, backend="draftopt", options={...})`` works without
importing draftopt. ``options`` takes DraftConfig's fields; ``mode`` is passed
on to Inductor (``"reduce-overhead"``: CUDA graphs).
"""

from __future__ import annotations

import logging

import torch

from .passes import DraftAttentionPass
from .config import DraftConfig
from .report import GraphRecord, op_counts

log = logging.getLogger(__name__)

# Every graph the backend compiled in this process (draftopt.report() with no model).
GRAPHS: list[GraphRecord] = []


def draftopt_backend(gm: torch.fx.GraphModule, example_inputs, options=None, mode=None, records=None):
    """Rewrite the graph's video self-attention, then compile it with ``config.compiler``."""
    config = DraftConfig.from_options(options)
    record = GraphRecord(index=len(GRAPHS), counts_before=op_counts(gm.graph), code_before=gm.code, config=config)
    record.sites = DraftAttentionPass(config)(gm, example_inputs)
    record.counts_after, record.code_after = op_counts(gm.graph), gm.code
    GRAPHS.append(record)
    if records is not None:
        records.append(record)
    rewritten = sum(s.status == "rewritten" for s in record.sites)
    log.info("draftopt: graph %d: %d attention sites, %d rewritten", record.index, len(record.sites), rewritten)
    return compile_graph(gm, example_inputs, config.compiler, mode)


def compile_graph(gm, example_inputs, compiler: str, mode: str | None = None):
    if compiler == "eager":
        return gm.forward
    if compiler == "aot_eager":
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches=list_mode_options(mode) if mode else {})
