"""The draft-attention rewrite: each eligible site becomes five stages of ops.

    q, k  -> draftopt.tile_moments -> draftopt.block_mass -> draftopt.select_blocks -> kv_idx, kv_cnt
             (policy "mass"; the others: draftopt.tile_pool -> draftopt.draft_map)
    mask  -> draftopt.key_bias
    q,k,v -> draftopt.tiled_attention                    (stages 3-5 fused, where the plan says so)
          or draftopt.permute_tiles -> draftopt.block_sparse_attention -> draftopt.unpermute_tiles

A site the pass cannot handle exactly (cross-attention, causal, dropout, a
per-query mask other than the outer product of one padding vector, a sequence
length the geometry does not explain, dynamic shapes, ...) is left as it was
and recorded with the reason. A mask proven to be ``m[..., :, None] &
m[..., None, :]`` (HunyuanVideo 1.5; passes/masks.py) is taken as key padding
``m``, and the query rows it hides entirely get what SDPA gives them. For the others
``_plan`` returns a ``SitePlan``: the geometry, the scale and the attention
kernel that ``draftopt.kernels.plan`` chose (recorded in the report). The pass
inserts the ops by their ``torch.ops.draftopt`` names.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.fx as fx

from ..kernels import AttentionPlan, Geometry, check_key_padding_mask, needs_visual_bias, plan
from ..kernels._utils import MAX_HEAD_DIM, SUPPORTED_DTYPES
from ..kernels.dispatch import FP8_NAME, describe
from ..kernels.layout import tile_layout
from .config import DraftConfig
from .infer_geometry import grid_sources, is_static, n_tokens, text_before_from_graph
from .masks import OuterProductMask, masked_row_value, outer_product_mask
from .parallel import context_parallel_kind, graph_has_collectives
from .sites import AttentionSite, default_scale, example_value, find_attention_sites

log = logging.getLogger(__name__)

_COPIED_META = ("nn_module_stack", "stack_trace", "source_fn_stack")


@dataclass
class SiteRecord:
    """What the pass found at one attention site and what it did."""

    name: str
    kind: str  # "sdpa" or "explicit"
    status: str = "skipped"  # "rewritten" or "skipped"
    reason: str = ""
    q_shape: tuple = ()
    kv_shape: tuple = ()
    dtype: str = ""
    grid: tuple | None = None
    grid_source: str = ""
    text_len: int | None = None
    text_position: str | int | None = None  # "start", "end", or the count before the grid (Geometry's)
    tile: tuple = ()  # the Geometry's tile ((1, 128) for strips, whose Geometry grid is (T, 1, H * W))
    layout: str = ""  # the report's tile cell: "8x16", "strips", "strips (auto)"
    n_tiles: int | None = None
    sparsity: float | None = None
    policy: str | None = None
    has_mask: bool = False
    mask_form: str = ""  # "key padding" or "query x key padding" (an outer product) for a rewritten mask
    parallel: str = ""  # "ulysses" when the rank's q/k/v arrive through all-to-alls
    kernel: str = ""  # the attention backend the plan chose ("gluon_sm90", "triton", "torch")
    fused: bool = False  # permute, attention and unpermute in one op
    in_place: bool = False  # that op's kernel reads tiles in place (no permuted copies)
    kernel_reason: str = ""
    precision: str = ""  # what the rewritten site computes in: its dtype or "fp8 e4m3"
    # A video self-attention site draftopt should rewrite (False: cross-attention, text-only, or dense on
    # request): a candidate left dense is what the backend warns about.
    candidate: bool = True
    node: str = ""

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def rewritten(cls, name: str, kind: str, node: str, att: AttentionPlan, facts: dict) -> "SiteRecord":
        return cls(name, kind, "rewritten", node=node, kernel=att.backend.value, fused=att.fused,
                   in_place=att.in_place, kernel_reason=att.reason, precision=att.precision, **facts)

    @property
    def plan(self) -> str:
        """The attention plan in words ("gluon_sm90, fused in place"), "-" for a skipped site."""
        if self.status != "rewritten":
            return "-"
        return describe(self.kernel, self.fused, self.in_place, self.precision == FP8_NAME)


@dataclass(frozen=True)
class SitePlan:
    """How one site is rewritten."""

    geometry: Geometry
    scale: float
    attention: AttentionPlan
    key_mask: bool  # the site has a key padding mask (the key bias can be nonzero on real visual keys)
    facts: dict  # what the report records (shapes, grid, text, ...)
    # An outer-product mask: its vector is the key padding, and the query rows it hides get ``masked_rows``
    # ("zero", "nan", "mean_v": what SDPA gives a row that attends to nothing on this device).
    query_mask: OuterProductMask | None = None
    masked_rows: str | None = None


class _Skip(Exception):
    def __init__(self, reason: str, facts: dict, candidate: bool = True):
        super().__init__(reason)
        self.facts = facts
        self.candidate = candidate


@dataclass(frozen=True)
class ModelContext:
    """What ``draftopt.optimize`` knows about the model beyond the graph."""

    # model.config's patch size: used with latent_shape when neither patch_size nor a patch convolution in
    # the graph says (Linear patch embeddings, regional graphs).
    patch: tuple | None = None
    # The RuntimeControl (kernels/control.py) the selection reads with runtime_sparsity; -1: none.
    control_key: int = -1
    # The model's hidden-state stream is [history, video] (model_info.history_before_grid): where a graph does
    # not show how that stream was concatenated, its tokens beside the grid come before the grid.
    history_first: bool = False


@dataclass
class DraftAttentionPass:
    """Rewrite the video self-attention sites of a Dynamo graph in place.

    Example:
        >>> records = DraftAttentionPass(DraftConfig(sparsity=0.9))(gm, example_inputs)
        >>> [r.status for r in records]
        ['rewritten', 'skipped', ...]
    """

    config: DraftConfig
    context: ModelContext = field(default_factory=lambda: ModelContext())
    counters: dict = field(default_factory=lambda: {"found": 0, "rewritten": 0, "skipped": 0})

    def __call__(self, gm: fx.GraphModule, example_inputs=None) -> list[SiteRecord]:
        cfg = self.config
        sites = find_attention_sites(gm.graph)
        sources = grid_sources(gm.graph, cfg.latent_shape, cfg.patch_size, self.context.patch) if sites else []
        parallel = graph_has_collectives(gm.graph)
        records, dense_left = [], cfg.dense_layers
        for site in sites:
            self.counters["found"] += 1
            try:
                site_plan = self._plan(site, sources, parallel)
                if not cfg.enabled:
                    raise _Skip("dense mode (draftopt.dense): compiled unchanged", site_plan.facts, False)
                if dense_left > 0:
                    dense_left -= 1
                    raise _Skip(f"kept dense (dense_layers={cfg.dense_layers})", site_plan.facts, False)
            except _Skip as why:
                records.append(SiteRecord(site.name, site.kind, reason=str(why), node=site.node.name,
                                          candidate=why.candidate, **why.facts))
                self.counters["skipped"] += 1
                log.info("draftopt: skipped %s: %s", site.name, why)
                continue
            _rewrite(gm.graph, site, site_plan, cfg, self.context.control_key)
            att = site_plan.attention
            records.append(SiteRecord.rewritten(site.name, site.kind, site.node.name, att, site_plan.facts))
            self.counters["rewritten"] += 1
            log.info("draftopt: rewrote %s (%s; %s)", site.name, site_plan.geometry, att.describe())
        if self.counters["rewritten"]:
            gm.graph.lint()
            gm.recompile()
        return records

    # -- eligibility and geometry ------------------------------------------------------
    def _plan(self, site: AttentionSite, sources, parallel: bool) -> SitePlan:
        """The site's plan, or _Skip with the reason (and what was learnt about the site so far)."""
        cfg = self.config
        facts: dict = {}

        def skip(reason: str):
            return _Skip(reason, facts)

        q, k, v = (example_value(n) for n in (site.q, site.k, site.v))
        if q is None or k is None or v is None:
            raise skip("no shape information on q/k/v (not a Dynamo graph?)")
        facts.update(q_shape=_plain(q.shape), kv_shape=_plain(k.shape), dtype=str(q.dtype).replace("torch.", ""))
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise skip(f"q/k/v are not [B, heads, L, D] (q is {facts['q_shape']})")
        if not (is_static(q.shape) and is_static(k.shape) and is_static(v.shape)):
            raise skip("dynamic shapes: compile with dynamic=False (draftopt.optimize does) so each resolution "
                       "gets its own geometry")
        if site.is_causal:
            raise skip("causal attention")
        if not isinstance(site.dropout_p, (int, float)) or site.dropout_p != 0.0:
            raise skip(f"dropout_p={site.dropout_p}")
        if site.enable_gqa or k.shape[1] != q.shape[1]:
            raise skip(f"grouped-query attention ({q.shape[1]} query heads, {k.shape[1]} key heads)")
        if k.shape[2] != q.shape[2] or k.shape != v.shape:
            raise _Skip(f"cross-attention: {q.shape[2]} queries attend to {k.shape[2]} keys", facts, False)
        if parallel:
            kind, why = context_parallel_kind(site.q, site.k, site.v)
            if kind is None:
                raise skip(why)
            facts["parallel"] = kind
        B, H, L, D = q.shape
        grid, facts["grid_source"] = _grid_for(L, B, sources, facts)  # first: text-only sites are no candidates
        facts["grid"] = grid
        if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
            raise skip(f"dtype {q.dtype} (supported: float16, bfloat16, float32)")
        if D > MAX_HEAD_DIM:
            raise skip(f"head dim {D} > {MAX_HEAD_DIM}")
        if site.scale is not None and not isinstance(site.scale, (int, float)):
            raise skip("scale is not a constant")
        facts["has_mask"] = site.mask is not None
        query_mask = masked_rows = None
        if site.mask is not None:
            query_mask, masked_rows = self._mask_form(site, q, facts, skip)
        N = n_tokens(grid)
        text_len = text_len_for(L, grid, cfg.text_len, skip)
        position = "end"
        if text_len:
            position = cfg.text_position
            if position == "auto":
                position = text_before_from_graph(site.q, N, text_len, history_first=self.context.history_first)
                if position is None:
                    raise skip(f"{text_len} tokens besides the {N}-token grid, but the concatenations on q's path "
                               "do not show where the grid lies among them; pass text_position='start', 'end' "
                               "or the number of them before the grid")
            check_text_before(position, text_len, skip)
        geom = site_geometry(grid, text_len, position, cfg, facts, skip)
        scale = float(site.scale) if site.scale is not None else default_scale(D)
        attention = plan(geom, q.dtype, q.device, D, B, cfg.fuse_permute, cfg.precision)
        return SitePlan(geom, scale, attention, site.mask is not None, facts, query_mask, masked_rows)

    def _mask_form(self, site: AttentionSite, q, facts: dict, skip):
        """(None, None) for a key padding mask; (the outer product's vector, the masked rows' value) for
        ``m[..., :, None] & m[..., None, :]``; else _Skip with the reason."""
        B, H, L, D = q.shape
        m = example_value(site.mask)
        if m is None or not is_static(m.shape):
            raise skip("attention mask without a static shape")
        try:
            check_key_padding_mask(tuple(m.shape), B, H, L)
        except ValueError:
            outer = outer_product_mask(site.mask, B, H, L) if site.kind == "sdpa" else None
            if outer is None:
                raise skip(f"attn_mask of shape {tuple(m.shape)} is not a key padding mask (query dimension 1, "
                           "e.g. [B, 1, 1, L]) nor proven by the graph to be the outer product of one padding "
                           "vector (m[:, None, :, None] & m[:, None, None, :]): draftopt cannot sparsify "
                           "attention with another per-query mask") from None
            rows = self.config.masked_rows or masked_row_value(q.device, q.dtype, D)
            if rows is None:
                raise skip(f"query x key padding mask, but scaled_dot_product_attention on {q.device.type} "
                           f"{str(q.dtype).replace('torch.', '')} gives a fully masked query row neither 0, NaN "
                           "nor the mean of v: nothing to reproduce it with. Where those rows are padding no valid "
                           "token reads (HunyuanVideo 1.5), masked_rows='zero' lets them be zeros") from None
            given = " (masked rows: {}, by masked_rows)".format(rows) if self.config.masked_rows else ""
            facts["mask_form"] = "query x key padding" + given
            return outer, rows
        facts["mask_form"] = "key padding"
        return None, None


def text_len_for(L: int, grid, text_len: int | None, skip) -> int:
    """The text tokens beside the grid: the rest of the sequence, or the given count if it adds up."""
    N = n_tokens(grid)
    text_len = L - N if text_len is None else text_len
    if N + text_len != L:
        raise skip(f"sequence length {L} is not grid {'x'.join(map(str, grid))} = {N} tokens + text_len {text_len}")
    return text_len


def site_geometry(grid, text_len: int, position, cfg: DraftConfig, facts: dict, skip) -> Geometry:
    """The site's Geometry once grid and text are known, its facts recorded; too few tokens: skip."""
    facts.update(text_len=text_len, text_position=position if text_len else None)
    N = n_tokens(grid)
    if N < cfg.min_tokens:
        raise skip(f"too few tokens: {N} visual tokens < min_tokens={cfg.min_tokens}")
    adaptive = cfg.runtime_sparsity or cfg.max_error is not None  # the kept pairs may change at run time
    layout = tile_layout(grid, cfg.tile, cfg.sparsity, adaptive)  # strips see the grid as (T, 1, H * W)
    geom = layout.geometry(text_len, position)
    facts.update(text_position=geom.text_position if text_len else None,  # a count of 0 / all: "end" / "start"
                 tile=geom.tile, layout=layout.label, n_tiles=geom.n_tiles, sparsity=cfg.sparsity,
                 policy=cfg.policy)
    return geom


def check_text_before(position, text_len: int, skip) -> None:
    """A given count of tokens before the grid must fit this site's tokens off the grid."""
    if isinstance(position, int) and position > text_len:
        raise skip(f"text_position={position} tokens before the grid, but this site has {text_len} tokens besides "
                   "the grid")


def _plain(shape) -> tuple:
    """A shape for the record: ints, symbolic sizes as their names ("s0"); a record never holds a SymInt
    (it would break formatting and JSON long after the graph was compiled)."""
    return tuple(d if isinstance(d, int) else str(d) for d in shape)


def _grid_for(L: int, B: int, sources, facts: dict):
    if not sources:
        raise _Skip("no geometry: pass latent_shape=(T, H, W) (no patch embedding found in this graph)", facts)
    tried = []
    for src in sources:
        grid = src.resolve(B)
        if grid is None:
            continue
        tried.append(f"{'x'.join(map(str, grid))} = {n_tokens(grid)} ({src.source})")
        if n_tokens(grid) <= L:
            return grid, src.source
    if not tried:  # e.g. Latte's temporal attention: [B*H*W, heads, T, D] against per-frame patch embeddings
        raise _Skip(f"no grid for a batch of {B}: the patch embeddings ({'; '.join(s.source for s in sources)}) "
                    f"fold frames into a batch that is no multiple of {B} (attention across the frames at one "
                    "position, not over the video)", facts, False)
    # Shorter than the video: text-only attention (a prompt refiner), not a candidate.
    raise _Skip(f"sequence length {L} is shorter than every grid: " + "; ".join(tried), facts, False)


def _rewrite(graph: fx.Graph, site: AttentionSite, site_plan: SitePlan, cfg: DraftConfig, control_key: int = -1) -> None:
    """Insert the five stages before the site and route its users to the result."""
    q_val = example_value(site.q)
    B, H, _, _ = q_val.shape
    new_nodes = []

    def call(target, *args):
        n = graph.call_function(target, args)
        new_nodes.append(n)
        return n

    def method(name, *args):
        n = graph.call_method(name, args)
        new_nodes.append(n)
        return n

    with graph.inserting_before(site.node):
        mask = site.mask
        if site_plan.query_mask is not None:
            mask = _key_padding_vector(method, site_plan.query_mask, example_value(site.q).shape[2])
        args = StageArgs.of(site_plan, cfg, site.name, control_key)
        result = stages(call, site.q, site.k, site.v, mask, B, H, q_val.device, args)
        if site_plan.query_mask is not None:
            result = _fill_masked_rows(call, method, result, mask, site.v, site_plan.masked_rows)
    for n in new_nodes:
        n.meta.update({key: site.node.meta[key] for key in _COPIED_META if key in site.node.meta})
        n.meta["draftopt_site"] = site.name
    if site.kind == "explicit" and example_value(site.node) is not None:
        result = _cast_like(graph, result, site.node)
    site.node.replace_all_uses_with(result)
    pending = [site.node, *site.extra_nodes]  # the replaced chain: erase what nothing reads any more
    if site_plan.query_mask is not None:
        pending += site_plan.query_mask.nodes  # the [B, 1, L, L] mask, now unused
    while any(not n.users for n in pending):
        for n in [n for n in pending if not n.users]:
            graph.erase_node(n)
            pending.remove(n)


class StageArgs(NamedTuple):
    """What the five stages take besides tensors, all plain constants (the diffusers backend gets them from a
    function that Dynamo runs at trace time, so they must be constants to it)."""

    geometry: tuple  # Geometry.op_args(): (T, H, W, th, tw, text_len, text_before)
    block: int
    n_text_blocks: int
    scale: float
    backend: str  # the attention kernel the plan chose
    fused: bool
    key_mask: bool
    sparsity: float
    policy: str
    cdf_threshold: float
    capture_masks: bool
    site: str
    max_error: float | None = None  # the quality guard's bound (None: off)
    control_key: int = -1  # the RuntimeControl the selection reads (runtime_sparsity); -1: none
    fp8: bool = False  # e4m3 attention (the plan's precision)

    @classmethod
    def of(cls, site_plan: SitePlan, cfg: DraftConfig, site: str, control_key: int = -1) -> "StageArgs":
        geom, att = site_plan.geometry, site_plan.attention
        return cls(geom.op_args(), geom.block, geom.n_text_blocks, site_plan.scale, att.backend.value, att.fused,
                   site_plan.key_mask, float(cfg.sparsity), cfg.policy, float(cfg.cdf_threshold),
                   cfg.capture_masks, site, cfg.max_error, control_key, att.fp8)


def stages(call, q, k, v, mask, B: int, H: int, device, a: StageArgs):
    """The five stages over q, k, v [B, heads, L, D]: ``call(op, *args)`` inserts a node (the pass) or runs the
    op (the diffusers backend), so both entry points run the same ops with the same arguments."""
    ops = torch.ops.draftopt
    g = a.geometry
    draft = _score_map(call, q, k, g, a.scale, a.policy)
    if a.max_error is not None or a.control_key >= 0:  # the guard, or run-time values: the sort selection
        max_error = 1.0 if a.max_error is None else a.max_error
        sel = call(ops.select_blocks_guarded.default, draft, a.sparsity, max_error, a.control_key)
    else:
        sel = call(ops.select_blocks.default, draft, a.sparsity, a.policy, a.cdf_threshold)
    kv_idx, kv_cnt = call(operator.getitem, sel, 0), call(operator.getitem, sel, 1)
    if a.capture_masks:  # on the data path, so no compiler drops it
        kv_cnt = call(ops.record_mask.default, kv_idx, kv_cnt, draft, a.site, *g, a.policy, a.sparsity)
    bias = call(ops.key_bias.default, mask, B, H, *g, device)
    if a.fused:  # knows the grid: masks edge tiles' padding itself
        return call(ops.tiled_attention.default, q, k, v, kv_idx, kv_cnt, bias, a.scale, *g, a.key_mask,
                    a.backend, a.fp8)
    qp, kp, vp = (call(ops.permute_tiles.default, t, *g, 0.0) for t in (q, k, v))
    visual_bias = needs_visual_bias(a.key_mask, Geometry.from_op_args(*g))
    out = call(ops.block_sparse_attention.default, qp, kp, vp, kv_idx, kv_cnt, bias, a.scale, a.block,
               a.n_text_blocks, visual_bias, a.backend, a.fp8)
    return call(ops.unpermute_tiles.default, out, *g)


def _score_map(call, q, k, g: tuple, scale: float, policy: str):
    """The map the policy ranks (kernels.score_map, as ``call``s): block mass for "mass", else the draft map."""
    ops = torch.ops.draftopt
    if policy == "mass":
        q_mom, k_mom = call(ops.tile_moments.default, q, *g), call(ops.tile_moments.default, k, *g)
        moments = [call(operator.getitem, m, i) for m in (q_mom, k_mom) for i in (0, 1)]
        return call(ops.block_mass.default, *moments, *g, scale)
    q_pool, k_pool = call(ops.tile_pool.default, q, *g), call(ops.tile_pool.default, k, *g)
    return call(ops.draft_map.default, q_pool, k_pool, scale)


def _key_padding_vector(method, outer: OuterProductMask, L: int):
    """The outer product's vector as a bool key padding mask [B or 1, heads or 1, 1, L]."""
    vector = example_value(outer.vector)
    b, h, s = outer.axes
    named = [d for d in (b, h, s) if d is not None]
    order = named + [i for i in range(vector.dim()) if i not in named]  # the rest are size-1 axes
    x = outer.vector if order == list(range(vector.dim())) else method("permute", outer.vector, order)
    x = method("reshape", x, (outer.batch, outer.heads, 1, L))
    return x if vector.dtype == torch.bool else method("to", x, torch.bool)  # logical_and: truth values


def _fill_masked_rows(call, method, result, key_mask, v, value: str):
    """Query rows the mask hides entirely get what SDPA gives them (``masked_row_value``); the kernel computed
    them as key padding only. A where, not arithmetic: NaN in the other rows stays out."""
    keep = method("transpose", key_mask, -2, -1)  # [B|1, heads|1, L, 1]: the query rows that attend
    if value == "mean_v":
        fill = method("to", method("mean", method("float", v), -2, True), example_value(v).dtype)
    else:
        fill = 0.0 if value == "zero" else float("nan")
    return call(torch.where, keep, result, fill)


def _cast_like(graph: fx.Graph, result: fx.Node, old: fx.Node) -> fx.Node:
    """Explicit attention may produce another dtype than q (fp32 softmax @ v): keep it."""
    dtype = example_value(old).dtype
    with graph.inserting_after(result):
        cast = graph.call_method("to", (result, dtype))
    cast.meta.update({key: old.meta[key] for key in _COPIED_META if key in old.meta})
    return cast
