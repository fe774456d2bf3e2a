"""What the draftopt pass did, rendered: tables, markdown, JSON, HTML, code diff.

One ``GraphRecord`` per compiled graph (op counts and readable code before and
after the rewrite, the graph's total FLOPs), one ``SiteRecord`` per attention
site. FLOP figures are estimates: dense attention is 4*B*heads*Lq*Lk*D; the
sparse side counts the kernel's whole blocks (padding included) for the
expected number of kept tile pairs, all text blocks, and the draft map.
"""

from __future__ import annotations

import dataclasses
import difflib
import html
import json
import math
from collections import Counter
from dataclasses import dataclass, field

import logging
from typing import Callable

import torch
import torch.fx as fx

from .kernels.sparsity import expected_kept_tiles
from .passes import SiteRecord

log = logging.getLogger(__name__)

REPORT_VERSION = 1


# -- collecting --------------------------------------------------------------------------
def op_counts(graph: fx.Graph) -> Counter:
    """Node count per op: call_function targets by name, methods as '.name'."""
    counts = Counter()
    for n in graph.nodes:
        if n.op == "call_function":
            counts[_target_name(n.target)] += 1
        elif n.op == "call_method":
            counts[f".{n.target}"] += 1
    return counts


def _target_name(target) -> str:
    name = str(target)
    if name.startswith(("draftopt.", "aten.")):
        return name
    module = getattr(target, "__module__", None) or ""
    short = getattr(target, "__name__", name)
    return f"{module}.{short}" if module and module not in ("_operator", "builtins") else short


@dataclass
class GraphRecord:
    """One graph the draftopt backend compiled."""

    index: int
    sites: list = field(default_factory=list)
    counts_before: Counter = field(default_factory=Counter)
    counts_after: Counter = field(default_factory=Counter)
    code_before: str = ""
    code_after: str = ""
    flops_total: int | None = None  # the whole graph before the rewrite, once counted
    flops_error: str = ""  # why the graph's FLOPs could not be counted
    config: dict = field(default_factory=dict)
    # "torch.compile": a graph the draftopt backend compiled; "diffusers backend": the attention calls that
    # diffusers' dispatcher sent to draftopt's attention backend for one model (no graph, no op counts);
    # "onnx export": the ATen graph of draftopt.export_program / export_onnx.
    source: str = "torch.compile"
    onnx_nodes: dict = field(default_factory=dict)  # export_onnx: site name -> its ONNX node's name
    count_flops: Callable[[], int] | None = field(default=None, repr=False, compare=False)

    def graph_flops(self) -> int | None:
        """FLOPs of one run of the graph before the rewrite: counted on fake tensors at the first ask."""
        if self.count_flops is not None:
            count, self.count_flops = self.count_flops, None
            try:
                other = count()
            except (RuntimeError, NotImplementedError, TypeError) as e:  # shown in the report, not hidden
                self.flops_error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                log.warning("draftopt: could not count the FLOPs of graph %d: %s", self.index, self.flops_error)
            else:  # SDPA with the report's estimate: the counter misses SDPA's CPU kernels
                self.flops_total = other + sum(site_flops(s)[0] or 0 for s in self.sites if s.kind == "sdpa")
        return self.flops_total

    def to_dict(self) -> dict:
        self.graph_flops()
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "count_flops"}
        d["sites"] = [s.as_dict() for s in self.sites]
        d["counts_before"], d["counts_after"] = dict(self.counts_before), dict(self.counts_after)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GraphRecord":
        d = dict(d)
        d["sites"] = [site_from_dict(s) for s in d["sites"]]
        d["counts_before"], d["counts_after"] = Counter(d["counts_before"]), Counter(d["counts_after"])
        return cls(**d)


def site_from_dict(d: dict) -> SiteRecord:
    """A SiteRecord from JSON (lists back to tuples)."""
    return SiteRecord(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# -- FLOPs --------------------------------------------------------------------------------
def _text_cell(s: SiteRecord) -> str:
    """Tokens off the grid: "8@end", "7@start", "435@start+256@end" (text on both sides), "0", or "-"."""
    if not s.text_len:
        return "0" if s.text_len == 0 else "-"
    if isinstance(s.text_position, int):
        return f"{s.text_position}@start+{s.text_len - s.text_position}@end"
    return f"{s.text_len}@{s.text_position}"


def site_flops(s: SiteRecord) -> tuple[int | None, int | None]:
    """(dense, sparse) attention FLOPs of a site; sparse is None for a skipped site."""
    if len(s.q_shape) != 4 or len(s.kv_shape) != 4 or not all(isinstance(d, int) for d in (*s.q_shape, *s.kv_shape)):
        return None, None  # a symbolic size ("s0"): no number to give
    B, H, Lq, D = s.q_shape
    dense = 4 * B * H * Lq * s.kv_shape[2] * D
    if s.status != "rewritten":
        return dense, None
    S, block = s.n_tiles, s.tile[0] * s.tile[1]
    n_text = math.ceil((s.text_len or 0) / block)
    block_pairs = expected_kept_tiles(s.policy, s.sparsity, S) + S * n_text + n_text * (S + n_text)
    attend = 4 * B * H * D * block * block * block_pairs
    draft_map = 2 * (2 * B * H * S * S * D)  # two passes of q_pool @ k_pool^T
    return dense, attend + draft_map


# The site table's "source" column: how the site reached draftopt.
_SOURCES = {"torch.compile": "graph", "diffusers backend": "diffusers", "onnx export": "export"}
# Sources that are a rewritten graph (op counts, code diff, FLOPs).
_GRAPH_SOURCES = ("torch.compile", "onnx export")


def _gflop(x) -> str:
    return "-" if x is None else f"{x / 1e9:.3f}"


# -- the report ---------------------------------------------------------------------------
class Report:
    """The record of what draftopt did, for one optimized model or the whole process.

    Example:
        >>> model = draftopt.optimize(model, latent_shape=(21, 60, 104), sparsity=0.9)
        >>> model(*inputs)                       # compiles on the first call
        >>> rep = draftopt.report(model)
        >>> [(s.name, s.status) for s in rep.sites][:2]
        [('blocks.0.attn1', 'rewritten'), ('blocks.0.attn2', 'skipped')]
        >>> print(rep)                           # tables; also rep.to_markdown(), .to_html(), .to_json()
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

    # -- numbers ----------------------------------------------------------------------
    def totals(self) -> dict:
        dense = sparse = 0
        for s in self.sites:
            d, sp = site_flops(s)
            if d is not None:
                dense += d
                sparse += d if sp is None else sp
        compiled = [g for g in self.graphs if g.source in _GRAPH_SOURCES]
        graph_total = [g.graph_flops() for g in compiled]
        total = sum(graph_total) if graph_total and None not in graph_total else None
        return {
            "graphs": len(compiled), "backend_models": len(self.graphs) - len(compiled), "sites": len(self.sites),
            "rewritten": len(self.rewritten), "skipped": len(self.skipped),
            "attention_flops_dense": dense, "attention_flops_sparse": sparse,
            "attention_flops_saved": 1 - sparse / dense if dense else 0.0,
            "graph_flops": total, "attention_share": dense / total if total else None,
        }

    # -- tables -----------------------------------------------------------------------
    def _op_rows(self, g: GraphRecord) -> list[list]:
        ops = sorted(set(g.counts_before) | set(g.counts_after))
        rows = [[op, g.counts_before[op], g.counts_after[op], f"{g.counts_after[op] - g.counts_before[op]:+d}"]
                for op in ops if g.counts_before[op] != g.counts_after[op]]
        nb, na = sum(g.counts_before.values()), sum(g.counts_after.values())
        return rows + [["(all ops)", nb, na, f"{na - nb:+d}"]]

    def _onnx_nodes(self) -> bool:
        """Whether a graph was exported to ONNX: the site table gets an "onnx node" column."""
        return any(g.onnx_nodes for g in self.graphs)

    def _site_rows(self) -> list[list]:
        rows, onnx = [], self._onnx_nodes()
        for g in self.graphs:
            for s in g.sites:
                d, sp = site_flops(s)
                grid = "x".join(map(str, s.grid)) if s.grid else "-"
                tile = s.layout or ("x".join(map(str, s.tile)) if s.tile else "-")  # "strips (auto)", "8x16"
                text = _text_cell(s)
                mask = s.mask_form or ("other" if s.has_mask else "-")
                rows.append([
                    g.index, _SOURCES.get(g.source, g.source), s.name, s.kind, "x".join(map(str, s.q_shape)) or "-",
                    s.kv_shape[2] if len(s.kv_shape) == 4 else "-", grid,
                    tile, s.n_tiles if s.n_tiles is not None else "-", text,
                    mask, s.policy or "-", "-" if s.sparsity is None else f"{s.sparsity:g}", _gflop(d), _gflop(sp),
                    s.parallel or "-", s.plan, s.precision or s.dtype or "-", s.status, s.reason or "-",
                ])
                if onnx:  # next to the site's name
                    rows[-1].insert(3, g.onnx_nodes.get(s.name, "-"))
        return rows

    def _site_headers(self) -> list[str]:
        headers = list(self._SITE_HEADERS)
        return headers[:3] + ["onnx node"] + headers[3:] if self._onnx_nodes() else headers

    _SITE_HEADERS = ["graph", "source", "site", "kind", "q BxHxLxD", "kv L", "grid", "tile", "S", "text", "mask",
                     "policy", "sparsity", "GFLOP dense", "GFLOP sparse", "parallel", "kernel", "precision", "status", "reason"]
    _OP_HEADERS = ["op", "before", "after", "change"]

    def _summary_lines(self) -> list[str]:
        t = self.totals()
        backend = f" + {t['backend_models']} model(s) through the diffusers backend" if t["backend_models"] else ""
        lines = [f"{t['graphs']} graph(s){backend}, {t['sites']} attention site(s): {t['rewritten']} rewritten, "
                 f"{t['skipped']} skipped"]
        if t["attention_flops_dense"]:
            lines.append(f"attention: {_gflop(t['attention_flops_dense'])} GFLOP dense -> "
                         f"{_gflop(t['attention_flops_sparse'])} GFLOP (estimated), "
                         f"{t['attention_flops_saved']:.1%} saved")
        if t["attention_share"] is not None:
            lines.append(f"attention is {t['attention_share']:.1%} of the graphs' {_gflop(t['graph_flops'])} GFLOP")
        lines += [f"graph {g.index}: FLOPs not counted ({g.flops_error})" for g in self.graphs if g.flops_error]
        return lines

    def render(self, fmt: str = "text") -> str:
        """The report as "text" (plain tables), "md" (markdown) or "html"."""
        from tabulate import tabulate

        if fmt == "html":
            return self.to_html()
        tablefmt = "github" if fmt == "md" else "simple"
        if not self.graphs:
            return "draftopt report: no graph compiled yet (the model compiles on its first call)"
        h1, h2 = ("# ", "## ") if fmt == "md" else ("", "")
        out = [f"{h1}draftopt report", "", *self._summary_lines(), "", f"{h2}Attention sites", "",
               tabulate(self._site_rows(), headers=self._site_headers(), tablefmt=tablefmt)]
        captured = self._captured_rows()
        if captured:
            out += ["", f"{h2}Captured masks (capture_masks=True; over heads, all calls)", "",
                    tabulate(captured, headers=self._CAPTURED_HEADERS, tablefmt=tablefmt)]
        for g in self.graphs:
            if g.source in _GRAPH_SOURCES:  # the diffusers backend changes no graph
                out += ["", f"{h2}Graph {g.index}: ops changed by the rewrite", "",
                        tabulate(self._op_rows(g), headers=self._OP_HEADERS, tablefmt=tablefmt)]
        return "\n".join(out)

    _CAPTURED_HEADERS = ["site", "calls", "policy", "kept fraction min / mean / max",
                         "estimated error min / mean / max", "heads widened by the guard"]

    def _captured_rows(self) -> list[list]:
        """Per rewritten site with captured masks: what each head kept and the draft's estimate of the
        attention mass it dropped (DraftBlockMask.kept_fraction / estimated_error / widened)."""
        from .kernels import captured_masks

        store, rows = captured_masks(), []
        for name in dict.fromkeys(s.name for s in self.rewritten):
            masks = store.get(name)
            if not masks:
                continue
            kept = torch.cat([m.kept_fraction().flatten().cpu() for m in masks])
            errors = [m.estimated_error() for m in masks]
            err = torch.cat([e.flatten().cpu() for e in errors]) if all(e is not None for e in errors) else None
            widened = sum(int(m.widened().sum()) for m in masks)
            heads = sum(m.kv_cnt.shape[0] * m.kv_cnt.shape[1] for m in masks)

            def spread(x):
                return "-" if x is None else f"{x.min():.3f} / {x.mean():.3f} / {x.max():.3f}"

            rows.append([name, len(masks), masks[0].policy, spread(kept), spread(err), f"{widened} of {heads}"])
        return rows

    def __str__(self) -> str:
        return self.render("text")

    __repr__ = __str__

    def to_markdown(self) -> str:
        return self.render("md")

    # -- machine-readable ---------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"version": REPORT_VERSION, "totals": self.totals(), "graphs": [g.to_dict() for g in self.graphs]}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "Report":
        data = json.loads(text)
        if data.get("version") != REPORT_VERSION:
            raise ValueError(f"report version {data.get('version')!r} is not {REPORT_VERSION}")
        return cls([GraphRecord.from_dict(g) for g in data["graphs"]])

    # -- code diff ------------------------------------------------------------------------
    def code_diff(self, context: int = 3) -> str:
        """A unified diff of each graph's readable code before and after the rewrite."""
        parts = []
        for g in self.graphs:
            parts.extend(difflib.unified_diff(
                g.code_before.splitlines(keepends=True), g.code_after.splitlines(keepends=True),
                fromfile=f"graph {g.index} (before)", tofile=f"graph {g.index} (after draftopt)", n=context))
        return "".join(parts)

    # -- html -----------------------------------------------------------------------------
    def to_html(self) -> str:
        """One self-contained page (inline CSS, no scripts, no network)."""
        from tabulate import tabulate

        def table(rows, headers):
            return tabulate(rows, headers=headers, tablefmt="html")

        diff_lines = []
        for line in self.code_diff().splitlines():
            cls = "add" if line.startswith("+") else "del" if line.startswith("-") else "hunk" if line.startswith("@@") else ""
            diff_lines.append(f'<span class="{cls}">{html.escape(line)}</span>')
        body = ["<h1>draftopt report</h1>", "<ul>" + "".join(f"<li>{html.escape(s)}</li>"
                                                             for s in self._summary_lines()) + "</ul>",
                "<h2>Attention sites</h2>", table(self._site_rows(), self._site_headers())]
        for g in self.graphs:
            if g.source in _GRAPH_SOURCES:
                body += [f"<h2>Graph {g.index}: ops changed by the rewrite</h2>",
                         table(self._op_rows(g), self._OP_HEADERS)]
        body += ["<h2>Code diff</h2>", "<pre>" + "\n".join(diff_lines) + "</pre>"]
        return _HTML_PAGE.format(body="\n".join(body))


_HTML_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>draftopt report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 13px; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; }}
th {{ background: #f3f3f3; }}
pre {{ background: #fafafa; border: 1px solid #ddd; padding: 1em; font-size: 12px; overflow-x: auto; }}
.add {{ color: #1a7f37; }} .del {{ color: #cf222e; }} .hunk {{ color: #8250df; }}
</style></head>
<body>
{body}
</body></html>
"""
