"""What the draftopt pass did: one GraphRecord per compiled graph, one SiteRecord per site."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch.fx as fx

from .passes import SiteRecord  # noqa: F401  (re-exported for users)


def op_counts(graph: fx.Graph) -> Counter:
    """Node count per op ("call_function" targets by name, methods as '.name')."""
    counts = Counter()
    for n in graph.nodes:
        if n.op == "call_function":
            counts[getattr(n.target, "__name__", None) and _target_name(n.target) or str(n.target)] += 1
        elif n.op == "call_method":
            counts[f".{n.target}"] += 1
    return counts


def _target_name(target) -> str:
    name = str(target)
    if name.startswith("draftopt.") or "::" in name or name.startswith("aten."):
        return name
    module = getattr(target, "__module__", None) or ""
    return f"{module}.{target.__name__}" if module and module != "_operator" else target.__name__


@dataclass
class GraphRecord:
    """One graph the draftopt backend compiled."""

    index: int
    sites: list = field(default_factory=list)
    counts_before: Counter = field(default_factory=Counter)
    counts_after: Counter = field(default_factory=Counter)
    code_before: str = ""
    code_after: str = ""
    config: object = None


class Report:
    """The record of what draftopt did, for one optimized model or the whole process.

    Example:
        >>> model = draftopt.optimize(model, latent_shape=(21, 60, 104), sparsity=0.9)
        >>> model(*inputs)                       # compiles on the first call
        >>> rep = draftopt.report(model)
        >>> [(s.name, s.status) for s in rep.sites][:2]
        [('blocks.0.attn1', 'rewritten'), ('blocks.0.attn2', 'skipped')]
    """

    def __init__(self, graphs: list[GraphRecord]):
        self.graphs = list(graphs)

    @property
    def sites(self) -> list[SiteRecord]:
        return [s for g in self.graphs for s in g.sites]

    @property
    def rewritten(self) -> list[SiteRecord]:
        return [s for s in self.sites if s.status == "rewritten"]

    @property
    def skipped(self) -> list[SiteRecord]:
        return [s for s in self.sites if s.status == "skipped"]

    def __len__(self) -> int:
        return len(self.sites)

    def __str__(self) -> str:
        from tabulate import tabulate

        if not self.graphs:
            return "draftopt report: no graph compiled yet (the model compiles on its first call)"
        rows = []
        for g in self.graphs:
            for s in g.sites:
                grid = "x".join(map(str, s.grid)) if s.grid else "-"
                text = f"{s.text_len}@{s.text_position}" if s.text_len else ("0" if s.text_len == 0 else "-")
                rows.append([g.index, s.name, s.kind, grid, text, s.status, s.reason or "-"])
        head = (f"draftopt report: {len(self.graphs)} graph(s), {len(self.sites)} attention site(s), "
                f"{len(self.rewritten)} rewritten, {len(self.skipped)} skipped")
        table = tabulate(rows, headers=["graph", "site", "kind", "grid", "text", "status", "reason"])
        return f"{head}\n{table}"

    __repr__ = __str__
