"""Export a model with draft attention: ``torch.export`` program, ONNX file.

    ep = draftopt.export_program(model, example_args, latent_shape=(T, H, W), sparsity=0.9)
    exported = draftopt.export_onnx(model, example_args, "model.onnx", sparsity=0.9)
    print(draftopt.report(exported))          # or draftopt.report("model.onnx")

How: ``torch.export`` traces the model to an ATen graph; ``DraftAttentionPass``
runs on a copy of that graph (the same eligibility checks, geometry and reasons
as ``optimize``); each site it rewrites becomes, in the exported graph, ONE call
of ``draftopt::draft_attention_onnx`` (all five stages: pool, map, select,
sparse attention, in the original token order) with the geometry, tile,
policy and sparsity as constant arguments. Every other site stays the model's
own ``scaled_dot_product_attention``. ``torch.onnx`` then translates the op to
one ``draftopt.DraftAttention`` node with an ONNX function body of standard
ops (onnx_ops.py), so onnxruntime runs the file without a plug-in.

The ATen graph spells the patch embedding, the text concatenation and the
Linear layers as ``aten.conv3d`` / ``aten.cat`` / ``aten.linear``; the pass
reads the torch-level spellings, so its copy of the graph is retargeted to
them first (``_torch_spellings``).

This module needs only torch; onnx, onnxscript and onnxruntime are imported
when an ONNX file is written (``pip install draftopt[onnx]``).
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import os
import warnings
import weakref
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import backend as _backend
from .kernels import draft_attention
from .kernels.layout import tile_layout
from .model_info import model_patch
from .passes import DraftAttentionPass, DraftConfig, ModelContext, SiteRecord, find_attention_sites
from .passes.sites import default_scale, example_value
from .report import GraphRecord, Report, op_counts

OP_NAME = "draftopt::draft_attention_onnx"
# Where the report travels inside an ONNX file (ModelProto.metadata_props).
REPORT_KEY = "draftopt.report"
ONNX_OPSET = 18
# The record of each program export_program / export_onnx rewrote (draftopt.report(ep)).
_RECORDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_EXTRAS = "pip install 'draftopt[onnx]' (onnx, onnxscript, onnxruntime)"


# -- the op: one site, all five stages -------------------------------------------------------
@torch.library.custom_op(OP_NAME, mutates_args=())
def draft_attention_onnx(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, T: int, H: int, W: int,
    th: int, tw: int, text_len: int, text_before: int, scale: float, sparsity: float, policy: str,
    cdf_threshold: float,
) -> torch.Tensor:
    """Draft attention of one video self-attention site, as the exported graph calls it (the PyTorch path
    of ``draftopt.kernels.draft_attention``; ``attn_mask``: SDPA's key padding mask or None)."""
    return draft_attention(q, k, v, (T, H, W), tile=(th, tw), text_len=text_len,
                           text_position=text_before, sparsity=sparsity, policy=policy,
                           cdf_threshold=cdf_threshold, attn_mask=attn_mask, scale=scale)


@draft_attention_onnx.register_fake
def _(q, k, v, attn_mask, T, H, W, th, tw, text_len, text_before, scale, sparsity, policy, cdf_threshold):
    return torch.empty_like(q)


# -- what the export did --------------------------------------------------------------------
@dataclass
class OnnxExport:
    """What ``export_onnx`` wrote: the file, the rewritten program, and the record of every site.

    ``draftopt.report(exported)`` renders the record with each rewritten site's ONNX node name
    (also stored in the file: ``draftopt.report(path)``).
    """

    path: str
    program: torch.export.ExportedProgram = field(repr=False)
    record: GraphRecord = field(repr=False)
    onnx_program: object = field(default=None, repr=False)  # torch.onnx.ONNXProgram

    @property
    def onnx_nodes(self) -> dict:
        """Site name -> name of its ``draftopt.DraftAttention`` node in the ONNX graph."""
        return dict(self.record.onnx_nodes)

    def report(self) -> Report:
        return Report([self.record])


# -- torch.export + the pass ------------------------------------------------------------------
# ATen overloads of an exported graph -> the torch-level spellings the pass reads (geometry: the patch
# embedding and the text concatenation; explicit softmax attention: matmul, transpose, scale, softmax).
_TORCH_SPELLINGS = {
    torch.ops.aten.cat.default: torch.cat,
    torch.ops.aten.conv3d.default: torch.conv3d,
    torch.ops.aten.conv2d.default: torch.conv2d,
    torch.ops.aten.linear.default: F.linear,
    torch.ops.aten.matmul.default: torch.matmul,
    torch.ops.aten.transpose.int: torch.transpose,
    torch.ops.aten.softmax.int: torch.softmax,
    torch.ops.aten.mul.Tensor: operator.mul,
    torch.ops.aten.div.Tensor: operator.truediv,
    torch.ops.aten.add.Tensor: operator.add,
}


def _torch_spellings(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of an exported graph for the pass to analyse, its ATen ops spelled as the torch functions
    Dynamo graphs hold (same arguments in the same places; ``add`` only without ``alpha``). Node names are
    kept, so the copy's sites name the exported graph's nodes. Only the copy changes."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    for n in graph.nodes:
        if n.op == "call_function" and n.target in _TORCH_SPELLINGS and not n.kwargs:
            n.target = _TORCH_SPELLINGS[n.target]
    return fx.GraphModule(gm, graph)


@dataclass(frozen=True)
class _SiteNodes:
    """An attention site of the analysis copy, by the names of its nodes in the exported graph."""

    kind: str
    node: str
    q: str
    k: str
    v: str
    mask: str | None
    scale: float | None
    chain: tuple  # explicit attention: the nodes the site replaces

    @classmethod
    def of(cls, site) -> "_SiteNodes":
        name = lambda n: n.name if isinstance(n, fx.Node) else None  # noqa: E731
        return cls(site.kind, site.node.name, site.q.name, site.k.name, site.v.name, name(site.mask), site.scale,
                   tuple(n.name for n in site.extra_nodes))


_UNSUPPORTED = {
    "max_error": (None, "the quality guard keeps blocks by a data-dependent count that the DraftAttention "
                        "node does not carry yet"),
    "runtime_sparsity": (False, "an exported file has its sparsity fixed in the node's attributes"),
    "capture_masks": (False, "an exported graph cannot record masks"),
    "precision": (None, "the DraftAttention node computes in its inputs' dtype; FP8 attention is Hopper's Gluon "
                        "kernel, which ONNX runtimes do not have"),
}


def _config(config: dict) -> DraftConfig:
    cfg = DraftConfig.from_options(**config)
    for name, (default, why) in _UNSUPPORTED.items():
        if getattr(cfg, name) != default:
            raise ValueError(f"{name}={getattr(cfg, name)!r} is not supported by draftopt's export ({why}); "
                             f"leave {name} at {default!r}")
    return cfg


def _exported(model, example_args, example_kwargs) -> torch.export.ExportedProgram:
    if isinstance(model, torch.export.ExportedProgram):
        raise ValueError("export_program/export_onnx take the nn.Module (they call torch.export themselves), "
                         "got an ExportedProgram")
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule) or hasattr(model, "draftopt_config"):
        raise ValueError(f"got a compiled model ({type(model).__name__}); pass the original nn.Module "
                         "(model._orig_mod): the export rewrites it itself")
    if not isinstance(model, nn.Module):
        raise ValueError(f"expected an nn.Module, got {type(model).__name__}")
    if not isinstance(example_args, tuple):
        raise ValueError(f"example_args must be a tuple of the model's positional inputs, got "
                         f"{type(example_args).__name__}; wrap one input as (x,)")
    if example_kwargs is not None and not isinstance(example_kwargs, dict):
        raise ValueError(f"example_kwargs must be a dict of keyword inputs or None, got "
                         f"{type(example_kwargs).__name__}")
    with torch.no_grad():
        return torch.export.export(model.eval(), example_args, example_kwargs)


def export_program(model: nn.Module, example_args: tuple = (), *, example_kwargs: dict | None = None,
                   **config) -> torch.export.ExportedProgram:
    """``torch.export`` the model with each video self-attention site as one ``draftopt::draft_attention_onnx``.

    Args:
        model: the nn.Module (e.g. a diffusers WanTransformer3DModel), not a compiled one.
        example_args: a tuple of the model's positional inputs (the shapes the program is fixed to).
        example_kwargs: its keyword inputs, if any.
        config: ``optimize``'s keywords (DraftConfig fields): ``latent_shape``, ``sparsity``, ``policy``,
            ``tile``, ``min_tokens``, ``dense_layers``, ``strict``, ...

    Returns:
        The ExportedProgram; ``draftopt.report(ep)`` lists its sites. Sites the pass does not rewrite stay
        ``scaled_dot_product_attention`` (one ``DraftoptWarning`` names them with the reasons; ``strict=True``
        raises ``DenseSitesError``). To write ONNX with torch.onnx yourself::

            program = torch.onnx.export(ep, dynamo=True,
                                        custom_translation_table=draftopt.onnx_translation_table())
            draftopt.add_onnx_functions(program)   # the DraftAttention bodies: runs with no plug-in
            program.save(path)

        (``export_onnx`` does this, and names the nodes after their sites and stores the report in the file.)
    """
    cfg = _config(config)
    ep = _exported(model, example_args, example_kwargs)
    record = rewrite_program(ep, cfg, model_patch(model))
    _tell_dense(record, cfg.strict)
    return ep


def rewrite_program(ep: torch.export.ExportedProgram, cfg: DraftConfig, patch=None) -> GraphRecord:
    """Rewrite ``ep``'s graph in place (see the module doc); its record is kept for ``draftopt.report(ep)``."""
    gm = ep.graph_module
    record = GraphRecord(index=next(_backend._INDEX), counts_before=op_counts(gm.graph), code_before=gm.code,
                         config=dataclasses.asdict(cfg), source="onnx export")
    placeholders = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    record.count_flops = _backend.flop_counter(gm, placeholders)  # the graph before the rewrite
    copy = _torch_spellings(gm)
    sites = {s.node.name: _SiteNodes.of(s) for s in find_attention_sites(copy.graph)}  # before the pass erases them
    nodes = {n.name: n for n in gm.graph.nodes}
    out = []
    for rec in DraftAttentionPass(cfg, ModelContext(patch=patch))(copy):
        if rec.status == "rewritten":
            why = _not_exported(rec, sites.get(rec.node))
            if why:
                rec = dataclasses.replace(rec, status="skipped", reason=why, kernel="", fused=False, in_place=False,
                                          kernel_reason="")
            else:
                _replace_site(gm.graph, nodes, sites[rec.node], rec, cfg)
                rec = dataclasses.replace(rec, kernel="onnx", fused=True, in_place=True,
                                          kernel_reason="one draftopt::draft_attention_onnx call: ONNX node "
                                                        "draftopt.DraftAttention")
        out.append(rec)
    record.sites = out
    gm.graph.lint()
    gm.recompile()
    record.counts_after, record.code_after = op_counts(gm.graph), gm.code
    _RECORDS[ep] = record
    return record


def _not_exported(rec: SiteRecord, site: _SiteNodes | None) -> str:
    """Why a site the pass rewrote cannot be exported as one node ("" when it can)."""
    if site is None:
        return "the export found no attention call for this site in the exported graph"
    if rec.mask_form and rec.mask_form != "key padding":
        return (f"{rec.mask_form} mask: the DraftAttention node takes a key padding mask only; exported as "
                "plain attention")
    return ""


def _replace_site(graph: fx.Graph, nodes: dict, site: _SiteNodes, rec: SiteRecord, cfg: DraftConfig) -> None:
    """The site's attention call (SDPA, or the last matmul of explicit attention) -> one draft_attention_onnx."""
    old, q = nodes[site.node], nodes[site.q]
    layout = tile_layout(rec.grid, "strips" if rec.layout.startswith("strips") else rec.tile)
    geom = layout.geometry(rec.text_len or 0, rec.text_position or "end")
    scale = float(site.scale) if site.scale is not None else default_scale(example_value(q).shape[-1])
    args = (q, nodes[site.k], nodes[site.v], nodes[site.mask] if site.mask else None, *geom.op_args(), scale,
            float(cfg.sparsity), cfg.policy, float(cfg.cdf_threshold))
    with graph.inserting_before(old):
        node = graph.call_function(torch.ops.draftopt.draft_attention_onnx.default, args)
        result = node
        want = example_value(old).dtype
        if want != example_value(q).dtype:  # explicit attention in another dtype than q (fp32 softmax @ v)
            result = graph.call_function(torch.ops.aten._to_copy.default, (node,), {"dtype": want})
    node.meta.update(old.meta)  # val (shape), nn_module_stack, stack_trace
    node.meta["val"] = torch.empty_like(example_value(q))
    node.meta["draftopt_site"] = rec.name
    if result is not node:
        result.meta.update(old.meta)
    old.replace_all_uses_with(result)
    pending = [old, *(nodes[n] for n in site.chain)]  # explicit attention: the rest of its chain, now unused
    while any(not n.users for n in pending):
        for n in [n for n in pending if not n.users]:
            graph.erase_node(n)
            pending.remove(n)


def _tell_dense(record: GraphRecord, strict: bool) -> None:
    """One warning (strict: an error) naming the video self-attention sites exported dense, with the reasons."""
    dense = [s for s in record.sites if s.status != "rewritten" and s.candidate]
    if not dense:
        return
    candidates = sum(s.candidate or s.status == "rewritten" for s in record.sites)
    listed = "; ".join(f"{s.name}: {s.reason}" for s in dense)
    message = (f"draftopt export: {candidates - len(dense)} of {candidates} video self-attention sites exported "
               f"as draft attention; {len(dense)} exported dense (plain attention): {listed}")
    if strict:
        raise _backend.DenseSitesError(message + " (strict=True)")
    warnings.warn(message, _backend.DraftoptWarning, stacklevel=3)


# -- ONNX ----------------------------------------------------------------------------------------
def onnx_translation_table() -> dict:
    """``torch.onnx.export(..., dynamo=True, custom_translation_table=...)`` for draftopt's export op:
    ``draftopt::draft_attention_onnx`` -> one ``draftopt.DraftAttention`` node with its function body."""
    _need_onnx()
    from .onnx_ops import translation_table

    return translation_table()


def add_onnx_functions(model):
    """Attach the ONNX function bodies of the draftopt domain to a model that ``torch.onnx.export`` wrote
    with ``onnx_translation_table()`` (an ``ONNXProgram``, an ``onnx_ir.Model`` or an ``onnx.ModelProto``;
    changed in place and returned), so that onnxruntime runs its ``draftopt.DraftAttention`` nodes with no
    plug-in. (torch.onnx inlines the functions a translation brings along, which would dissolve the
    nodes; so the translation emits the bare nodes and the bodies come after.) It also rewrites ``Where``
    over bool tensors as And/Or/Not: onnxruntime's CPU provider has no such kernel, and torch.onnx emits
    one for ``masked_fill`` on a bool mask (HunyuanVideo's attention mask)."""
    _need_onnx()
    from .onnx_ops import add_onnx_functions as add

    return add(model)


def _need_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"ONNX export needs onnx and onnxscript ({e.name} is missing): {_EXTRAS}") from None


def export_onnx(model: nn.Module, example_args: tuple, path, *, example_kwargs: dict | None = None,
                opset_version: int = ONNX_OPSET, optimize: bool = True, **config) -> OnnxExport:
    """Write ``model`` as an ONNX file whose video self-attention sites are ``draftopt.DraftAttention`` nodes.

    Args:
        model: the nn.Module (not a compiled one).
        example_args: a tuple of the model's positional inputs; the file has their (static) shapes.
        path: where the .onnx file goes (weights inside it; external data beside it past 2 GB).
        example_kwargs: keyword inputs, if any.
        opset_version: the standard ONNX opset (18 or later).
        optimize: run torch.onnx's graph optimizer (constant folding, fusions; it keeps the draftopt nodes).
        config: ``optimize``'s keywords (``latent_shape``, ``sparsity``, ``policy``, ``min_tokens``, ...).

    Each rewritten site is one node of the custom domain ``draftopt`` with the geometry, tile, policy and
    sparsity as attributes and an ONNX function body of standard ops: onnxruntime (CPU, no plug-in) runs the
    file and computes what the PyTorch op computes. The body computes dense scores and masks them: the
    file is portable, not fast (a runtime plug-in for the node would be: docs/tensorrt.md). Every other
    node is standard ONNX. Sites that cannot be rewritten are exported as plain attention, named with their
    reasons in one ``DraftoptWarning`` (``strict=True`` raises ``DenseSitesError``).

    Returns:
        An ``OnnxExport``; ``draftopt.report(exported)`` lists every site with its ONNX node name.

    Example:
        >>> exported = draftopt.export_onnx(transformer, (latents, t, text), "wan.onnx",
        ...                                 latent_shape=(21, 60, 104), sparsity=0.9)
        >>> print(draftopt.report(exported))
    """
    _need_onnx()
    if not isinstance(opset_version, int) or isinstance(opset_version, bool) or opset_version < ONNX_OPSET:
        raise ValueError(f"opset_version must be an int >= {ONNX_OPSET} (the function bodies use opset "
                         f"{ONNX_OPSET}), got {opset_version!r}")
    path = os.fspath(path)
    cfg = _config(config)
    ep = _exported(model, example_args, example_kwargs)
    record = rewrite_program(ep, cfg, model_patch(model))
    _tell_dense(record, cfg.strict)
    program, record.onnx_nodes = _to_onnx(ep, opset_version, optimize)
    program.model.metadata_props[REPORT_KEY] = Report([record]).to_json(indent=None)
    program.save(path)
    return OnnxExport(path, ep, record, program)


def _to_onnx(ep: torch.export.ExportedProgram, opset_version: int, optimize: bool):
    """``torch.onnx.export`` of a rewritten program, with the draftopt functions attached and the draftopt
    nodes named after their sites: (ONNXProgram, site -> node name)."""
    from .onnx_ops import add_onnx_functions, translation_table

    sites = [n.meta["draftopt_site"] for n in ep.graph.nodes if "draftopt_site" in n.meta]
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)  # "torchvision is not installed": torch.onnx's notes, not the user's
    try:
        with warnings.catch_warnings():  # torch.onnx's own deprecation notes
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.onnx.export(ep, (), dynamo=True, custom_translation_table=translation_table(),
                                        opset_version=opset_version, optimize=optimize, verbose=False)
    finally:
        registry_log.setLevel(level)
    add_onnx_functions(program)
    return program, name_draftopt_nodes(program.model, sites)


def name_draftopt_nodes(model, sites: list) -> dict:
    """Name the ``draftopt.DraftAttention`` nodes of the ONNX IR ``model`` after their sites
    (``draftopt/blocks.0.attn1``), ``sites`` being the rewritten sites in graph order; returns site -> node name.

    A node's site is the module path torch.onnx records in its name scopes (the op's own scope last), else
    its position: torch.onnx translates the graph in order.
    """
    from .onnx_ops import DOMAIN, OP_TYPE

    nodes = [n for n in model.graph if n.domain == DOMAIN and n.op_type == OP_TYPE]
    if len(nodes) != len(sites):
        raise RuntimeError(f"the ONNX graph has {len(nodes)} {DOMAIN}.{OP_TYPE} nodes for {len(sites)} rewritten "
                           "sites; the export lost or duplicated a site (please report this)")
    unique = {s for s in sites if sites.count(s) == 1}
    names = {}
    for i, node in enumerate(nodes):
        scopes = _scopes(node)
        site = scopes[-2] if len(scopes) >= 2 and scopes[-2] in unique else sites[i]
        name = f"draftopt/{site}" if site not in names else f"draftopt/{site}#{i}"
        node.name = name
        names.setdefault(site, name)
    return names


def _scopes(node) -> list:
    import ast

    try:
        return list(ast.literal_eval(node.metadata_props.get("pkg.torch.onnx.name_scopes", "[]")))
    except (ValueError, SyntaxError):
        return []


def report_of(obj) -> Report | None:
    """The report of an OnnxExport, an exported program or an ONNX file written by export_onnx (else None)."""
    if isinstance(obj, OnnxExport):
        return obj.report()
    if isinstance(obj, torch.export.ExportedProgram):
        record = _RECORDS.get(obj)
        if record is None:
            raise ValueError("this ExportedProgram was not made by draftopt.export_program (no draftopt record)")
        return Report([record])
    if isinstance(obj, (str, os.PathLike)) and os.fspath(obj).endswith(".onnx"):
        _need_onnx()
        import onnx

        proto = onnx.load(os.fspath(obj), load_external_data=False)
        meta = {p.key: p.value for p in proto.metadata_props}
        if REPORT_KEY not in meta:
            raise ValueError(f"{os.fspath(obj)} has no draftopt report in its metadata (not written by "
                             "draftopt.export_onnx)")
        return Report.from_json(meta[REPORT_KEY])
    return None


__all__ = ["OnnxExport", "add_onnx_functions", "draft_attention_onnx", "export_onnx", "export_program",
           "onnx_translation_table", "rewrite_program"]
