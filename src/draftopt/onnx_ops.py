"""The ONNX side of draftopt's export: the ``draftopt.DraftAttention`` function and the translation table.

``draftopt::draft_attention_onnx`` (export.py: one video self-attention site,
all five stages) is translated to one node of the custom domain ``draftopt``::

    DraftAttention(q, k, v, key_bias) -> out
        q, k, v   [B, heads, L, D] float16 / bfloat16 / float32, L = T*H*W + text_len
        key_bias  float32, broadcastable to [B, heads, 1, L]: 0 where a key may be
                  attended, -inf where the key padding mask hides it (or the additive
                  mask SDPA was given)
        out       [B, heads, L, D], q's dtype

with static attributes: the geometry (``T``, ``H``, ``W``, ``tile_h``, ``tile_w``,
``text_len``, ``text_before``), ``scale``, ``sparsity``, ``policy``, ``cdf_threshold``
and what the body needs of them, computed at export time exactly as the PyTorch
op computes it (``keep``: the keep count, ``rank_mass``, ``rank_rows``,
``diagonal_in_keep``, ``cdf_cutoff``: see ``selection_attributes``).

The node carries an ONNX function body of standard ops (opset 18), so any
runtime that runs ONNX functions (onnxruntime, no plug-in) computes what the
PyTorch reference computes: the tile means (and spreads, for policy "mass") by
Reshape + ReduceSum over zero-padded tiles, the score map (the draft map
``softmax(q_pool k_pool^T * scale)``, or the estimated block mass over the D + 4
features of kernels/ops/block_mass.py), the selection by TopK (over each head's
flattened map, or per query tile), the block mask expanded to tokens (text rows
and columns dense), and masked softmax attention with the key bias. The body
computes dense scores and masks them: a portability path, not a fast one. A
runtime with a plug-in for ``draftopt.DraftAttention`` (docs/tensorrt.md) runs
the sparse kernel instead, reading the same attributes.

How the body gets there: torch.onnx inlines the ONNX functions a translation
brings along (its version converter does, at every export), which would
dissolve the node into standard ops. So the translation emits the bare node (its
schema registered with onnx, ``_schema``) and ``add_onnx_functions`` attaches
the functions ``DraftAttention`` and ``TileSums`` to the exported model after.

This module imports onnx and onnxscript; ``import draftopt`` does not import it.
"""

import math
from typing import TypeVar, Union

import onnxscript
from onnxscript import BFLOAT16, BOOL, FLOAT, FLOAT16
from onnxscript import opset18 as op
from onnxscript.values import Opset

from .kernels.sparsity import GLOBAL_POLICIES, keep_count

DOMAIN = "draftopt"
OP_TYPE = "DraftAttention"
DOMAIN_VERSION = 1
OPSET = Opset(DOMAIN, DOMAIN_VERSION)
# q, k, v and the output: the float types draftopt takes.
TFloat = TypeVar("TFloat", bound=Union[FLOAT16, FLOAT, BFLOAT16])


def selection_attributes(policy: str, sparsity: float, n_tiles: int) -> dict:
    """The derived attributes of a DraftAttention node, as the PyTorch selection (kernels/sparsity.py) has them.

    - ``keep``: blocks kept per ranking group (``keep_count``, rounded in Python as the op rounds it);
    - ``rank_mass``: 1 ranks the estimated block mass (policy "mass"), 0 the draft map;
    - ``rank_rows``: 1 ranks each query tile's row (``topk``, ``cdf``), 0 each head's whole map;
    - ``diagonal_in_keep``: 1 when the diagonal takes one of the ``keep`` slots (``topk``); else it is
      added after the selection;
    - ``cdf_cutoff``: 1 when a ranked block is kept only while the mass before it is < ``cdf_threshold``.

    At sparsity 0 every block is kept (``keep`` = all of them, no cutoff), as in the op.
    """
    S = n_tiles
    per_head = policy in GLOBAL_POLICIES
    return dict(keep=keep_count(sparsity, S * S) if per_head else keep_count(sparsity, S),
                rank_mass=int(policy == "mass"), rank_rows=int(not per_head),
                diagonal_in_keep=int(policy == "topk"), cdf_cutoff=int(policy == "cdf" and sparsity > 0.0))


@onnxscript.script(OPSET, default_opset=op)
def TileSums(x: FLOAT, T: int, H: int, W: int, tile_h: int, tile_w: int, text_len: int, text_before: int) -> FLOAT:
    """Sum of ``x`` [B, heads, L, D] over each tile of each frame: [B, heads, S, D] (zero-padded edge tiles)."""
    Tn = op.Unsqueeze(op.Constant(value_int=T), op.Constant(value_ints=[0]))
    Hn = op.Unsqueeze(op.Constant(value_int=H), op.Constant(value_ints=[0]))
    Wn = op.Unsqueeze(op.Constant(value_int=W), op.Constant(value_ints=[0]))
    th = op.Unsqueeze(op.Constant(value_int=tile_h), op.Constant(value_ints=[0]))
    tw = op.Unsqueeze(op.Constant(value_int=tile_w), op.Constant(value_ints=[0]))
    tb = op.Unsqueeze(op.Constant(value_int=text_before), op.Constant(value_ints=[0]))
    one = op.Constant(value_ints=[1])
    zero = op.Constant(value_ints=[0])
    nh = op.Div(Hn + th - one, th)
    nw = op.Div(Wn + tw - one, tw)
    start = tb
    vis = op.Slice(x, start, start + Tn * Hn * Wn, op.Constant(value_ints=[2]))
    shape = op.Shape(x)
    bh = op.Slice(shape, op.Constant(value_ints=[0]), op.Constant(value_ints=[2]))
    d = op.Slice(shape, op.Constant(value_ints=[3]), op.Constant(value_ints=[4]))
    grid = op.Reshape(vis, op.Concat(bh, Tn, Hn, Wn, d, axis=0))  # [B, heads, T, H, W, D]
    zeros3 = op.Constant(value_ints=[0, 0, 0])
    pads = op.Concat(zeros3, zeros3, zeros3, nh * th - Hn, nw * tw - Wn, zero, axis=0)
    padded = op.Pad(grid, pads)
    tiles = op.Reshape(padded, op.Concat(bh, Tn, nh, th, nw, tw, d, axis=0))
    sums = op.ReduceSum(tiles, op.Constant(value_ints=[4, 6]), keepdims=0)  # [B, heads, T, nh, nw, D]
    return op.Reshape(sums, op.Concat(bh, Tn * nh * nw, d, axis=0))


@onnxscript.script(OPSET, default_opset=op)
def DraftAttention(q: TFloat, k: TFloat, v: TFloat, key_bias: FLOAT, T: int, H: int, W: int, tile_h: int,
                   tile_w: int, text_len: int, text_before: int, scale: float, sparsity: float, policy: str,
                   cdf_threshold: float, keep: int, rank_mass: int, rank_rows: int, diagonal_in_keep: int,
                   cdf_cutoff: int) -> TFloat:
    """Draft attention of one video self-attention site (module doc): standard ops, dense scores, masked."""
    qf = op.Cast(q, to=FLOAT.dtype)
    kf = op.Cast(k, to=FLOAT.dtype)
    vf = op.Cast(v, to=FLOAT.dtype)
    Tn = op.Unsqueeze(op.Constant(value_int=T), op.Constant(value_ints=[0]))
    Hn = op.Unsqueeze(op.Constant(value_int=H), op.Constant(value_ints=[0]))
    Wn = op.Unsqueeze(op.Constant(value_int=W), op.Constant(value_ints=[0]))
    th = op.Unsqueeze(op.Constant(value_int=tile_h), op.Constant(value_ints=[0]))
    tw = op.Unsqueeze(op.Constant(value_int=tile_w), op.Constant(value_ints=[0]))
    tl = op.Unsqueeze(op.Constant(value_int=text_len), op.Constant(value_ints=[0]))
    tb = op.Unsqueeze(op.Constant(value_int=text_before), op.Constant(value_ints=[0]))
    one = op.Constant(value_ints=[1])
    zero = op.Constant(value_ints=[0])
    nh = op.Div(Hn + th - one, th)
    nw = op.Div(Wn + tw - one, tw)
    N = Tn * Hn * Wn
    S = Tn * nh * nw
    shape = op.Shape(q)
    bh = op.Slice(shape, op.Constant(value_ints=[0]), op.Constant(value_ints=[2]))
    D = op.Slice(shape, op.Constant(value_ints=[3]), op.Constant(value_ints=[4]))
    sc = op.Constant(value_float=scale)

    # Stage 1: tile means and spreads (kernels/ops/pool.py).
    s_idx = op.Range(op.Squeeze(zero), op.Squeeze(S), op.Squeeze(one))
    hi = op.Mod(op.Div(s_idx, nw), nh)
    wi = op.Mod(s_idx, nw)
    counts = op.Cast(op.Min(Hn - hi * th, th) * op.Min(Wn - wi * tw, tw), to=FLOAT.dtype)  # [S]
    per_tile = op.Unsqueeze(counts, op.Constant(value_ints=[1]))  # [S, 1]
    q_mean = TileSums(qf, T=T, H=H, W=W, tile_h=tile_h, tile_w=tile_w, text_len=text_len,
                      text_before=text_before) / per_tile
    k_mean = TileSums(kf, T=T, H=H, W=W, tile_h=tile_h, tile_w=tile_w, text_len=text_len,
                      text_before=text_before) / per_tile
    q_sq_mean = TileSums(qf * qf, T=T, H=H, W=W, tile_h=tile_h, tile_w=tile_w, text_len=text_len,
                         text_before=text_before) / per_tile
    k_sq_mean = TileSums(kf * kf, T=T, H=H, W=W, tile_h=tile_h, tile_w=tile_w, text_len=text_len,
                         text_before=text_before) / per_tile
    last = op.Constant(value_ints=[-1])
    fzero = op.Constant(value_float=0.0)
    q_spread = op.Max(op.ReduceMean(q_sq_mean - q_mean * q_mean, last, keepdims=1), fzero)  # [B, h, S, 1]
    k_spread = op.Max(op.ReduceMean(k_sq_mean - k_mean * k_mean, last, keepdims=1), fzero)

    # Stage 2a: the map the policy ranks. The draft map (kernels/ops/draft_map.py) ...
    draft = op.Softmax(op.MatMul(q_mean, op.Transpose(k_mean, perm=[0, 1, 3, 2])) * sc, axis=-1)
    # ... or the estimated block mass over D + 4 features (kernels/ops/block_mass.py).
    c = op.Constant(value_float=0.5) * sc * sc
    cD = c * op.Cast(D, to=FLOAT.dtype)
    q_norm = op.ReduceSum(q_mean * q_mean, last, keepdims=1)
    k_norm = op.ReduceSum(k_mean * k_mean, last, keepdims=1)
    log_n = op.Expand(op.Log(per_tile), op.Shape(k_norm))
    ones = op.Expand(op.Constant(value_float=1.0), op.Shape(q_norm))
    q_feat = op.Concat(sc * q_mean, c * q_spread, c * q_norm, cD * q_spread, ones, axis=-1)
    k_feat = op.Concat(k_mean, k_norm, k_spread, k_spread, log_n, axis=-1)
    mass = op.Softmax(op.MatMul(q_feat, op.Transpose(k_feat, perm=[0, 1, 3, 2])), axis=-1) * per_tile
    score = op.Where(op.Cast(op.Constant(value_int=rank_mass), to=BOOL.dtype), mass, draft)  # [B, h, S, S]

    # Stage 2b: selection (kernels/sparsity.py): TopK per ranking group, the diagonal always kept.
    col = op.Unsqueeze(s_idx, op.Constant(value_ints=[0]))
    row = op.Unsqueeze(s_idx, op.Constant(value_ints=[1]))
    diag = op.Equal(row, col)  # [S, S]
    forced = op.Where(op.And(diag, op.Cast(op.Constant(value_int=diagonal_in_keep), to=BOOL.dtype)),
                      op.Constant(value_float=math.inf), score)
    by_rows = op.Cast(op.Unsqueeze(op.Constant(value_int=rank_rows), op.Constant(value_ints=[0])), to=BOOL.dtype)
    groups = op.Where(by_rows, S, one)
    group_len = op.Where(by_rows, S, S * S)
    ranked = op.Reshape(forced, op.Concat(bh, groups, group_len, axis=0))
    K = op.Unsqueeze(op.Constant(value_int=keep), op.Constant(value_ints=[0]))
    values, indices = op.TopK(ranked, K, axis=-1, largest=1, sorted=1)  # sorted: the cdf cutoff needs the order
    before = op.CumSum(values, op.Constant(value_int=-1)) - values  # the ranked mass ahead of each block
    live = op.Or(op.Not(op.Cast(op.Constant(value_int=cdf_cutoff), to=BOOL.dtype)),
                 op.Less(before, op.Constant(value_float=cdf_threshold)))
    chosen = op.ScatterElements(op.Expand(op.Constant(value_float=0.0), op.Shape(ranked)), indices,
                                op.Cast(live, to=FLOAT.dtype), axis=-1)
    kept = op.Max(op.Reshape(chosen, op.Shape(score)), op.Cast(diag, to=FLOAT.dtype))  # [B, h, S, S] 0/1

    # The block mask at token level, as an additive bias (0: computed, -inf: skipped) with the key bias in:
    # text queries and text keys are dense. Columns first ([B, h, S+1, L], small), then rows: row gathers.
    p = op.Range(op.Squeeze(zero), op.Squeeze(N + tl), op.Squeeze(one))
    j = p - tb
    visual = op.And(op.GreaterOrEqual(j, op.Squeeze(zero)), op.Less(j, op.Squeeze(N)))
    jc = op.Clip(j, op.Squeeze(zero), op.Squeeze(N - one))
    t_of = op.Div(jc, Hn * Wn)
    h_of = op.Mod(op.Div(jc, Wn), Hn)
    w_of = op.Mod(jc, Wn)
    tile_of = t_of * (nh * nw) + op.Div(h_of, th) * nw + op.Div(w_of, tw)
    token_tile = op.Where(visual, tile_of, op.Squeeze(S))  # [L]: text tokens -> S, the dense row and column
    ninf = op.Constant(value_float=-math.inf)
    block_bias = op.Where(op.Greater(kept, fzero), fzero, ninf)
    with_text = op.Pad(block_bias, op.Constant(value_ints=[0, 0, 0, 0, 0, 0, 1, 1]), fzero)  # [B, h, S+1, S+1]
    columns = op.Gather(with_text, token_tile, axis=3) + key_bias  # [B, h, S+1, L]
    token_bias = op.Gather(columns, token_tile, axis=2)  # [B, h, L, L]

    # Stages 3-5: attention over the kept keys (kernels/ops/attention.py's reference).
    scores = op.MatMul(qf, op.Transpose(kf, perm=[0, 1, 3, 2])) * sc + token_bias
    dead = op.Equal(op.ReduceMax(scores, last, keepdims=1), ninf)  # a query with no key gets 0, as the op gives
    out = op.MatMul(op.Softmax(scores, axis=-1), vf)
    return op.CastLike(op.Where(dead, fzero, out), q)


def _key_bias(attn_mask, L: int):
    """SDPA's key padding mask (bool: True attends; float: additive) as the node's float32 key bias,
    right-aligned to 4 dims; a zero bias [1, 1, 1, L] without a mask."""
    if attn_mask is None:
        return op.ConstantOfShape(op.Constant(value_ints=[1, 1, 1, L]))
    rank = len(attn_mask.shape)
    if rank < 4:
        shape = [1] * (4 - rank) + [int(d) for d in attn_mask.shape]
        attn_mask = op.Reshape(attn_mask, op.Constant(value_ints=shape))
    if attn_mask.dtype == BOOL.dtype:
        return op.Where(attn_mask, op.Constant(value_float=0.0), op.Constant(value_float=-math.inf))
    return op.Cast(attn_mask, to=FLOAT.dtype)


# -- the node's schema: what a runtime (or a plug-in) reads ----------------------------------------
_ATTRIBUTES = (  # name, ONNX type, description
    ("T", "INT", "frames of the token grid"),
    ("H", "INT", "token rows per frame"),
    ("W", "INT", "token columns per frame"),
    ("tile_h", "INT", "tile rows (tile_h * tile_w tokens: one block)"),
    ("tile_w", "INT", "tile columns"),
    ("text_len", "INT", "text tokens in the sequence (dense rows and columns)"),
    ("text_before", "INT", "how many of the text tokens come before the video tokens (the rest after)"),
    ("scale", "FLOAT", "softmax scale of q k^T"),
    ("sparsity", "FLOAT", "fraction of visual tile pairs skipped, in [0, 1)"),
    ("policy", "STRING", "selection policy: mass, percentile, topk or cdf"),
    ("cdf_threshold", "FLOAT", "draft mass a query tile covers (policy cdf)"),
    ("keep", "INT", "blocks kept per ranking group: keep_count(sparsity, S*S) per head for mass and "
                    "percentile, keep_count(sparsity, S) per query tile for topk and cdf"),
    ("rank_mass", "INT", "1: rank the estimated block mass (policy mass); 0: the draft map"),
    ("rank_rows", "INT", "1: rank each query tile's row (topk, cdf); 0: each head's whole map"),
    ("diagonal_in_keep", "INT", "1: the diagonal takes one of the keep slots (topk); 0: added after"),
    ("cdf_cutoff", "INT", "1: a ranked block is kept only while the mass before it is < cdf_threshold"),
)


def _schema():
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has(OP_TYPE, DOMAIN_VERSION, DOMAIN):
        return onnx.defs.get_schema(OP_TYPE, DOMAIN_VERSION, DOMAIN)
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    schema = OpSchema(
        OP_TYPE, DOMAIN, DOMAIN_VERSION,
        doc="Draft (block-sparse) self-attention of one video DiT attention site; see draftopt/onnx_ops.py.",
        inputs=[OpSchema.FormalParameter("q", "T", "queries [B, heads, L, D], L = T*H*W + text_len"),
                OpSchema.FormalParameter("k", "T", "keys [B, heads, L, D]"),
                OpSchema.FormalParameter("v", "T", "values [B, heads, L, D]"),
                OpSchema.FormalParameter("key_bias", "tensor(float)",
                                         "additive key bias broadcastable to [B, heads, 1, L] (0 or -inf)")],
        outputs=[OpSchema.FormalParameter("out", "T", "[B, heads, L, D]")],
        type_constraints=[("T", floats, "q, k, v and the output")],
        attributes=[OpSchema.Attribute(name, getattr(OpSchema.AttrType, kind), doc)
                    for name, kind, doc in _ATTRIBUTES],
    )
    onnx.defs.register_schema(schema)
    return schema


# The node itself: an op of the draftopt domain (its body is attached by add_onnx_functions).
_NODE = onnxscript.values.Op(OPSET, OP_TYPE, _schema())


def draft_attention_translation(q, k, v, attn_mask=None, T: int = 1, H: int = 1, W: int = 1, th: int = 16,
                                tw: int = 16, text_len: int = 0, text_before: int = 0, scale: float = 1.0,
                                sparsity: float = 0.0, policy: str = "mass", cdf_threshold: float = 0.9):
    """torch.onnx translation of ``draftopt::draft_attention_onnx``: one ``draftopt.DraftAttention`` node."""
    n_tiles = T * math.ceil(H / th) * math.ceil(W / tw)
    L = T * H * W + text_len
    return _NODE(q, k, v, _key_bias(attn_mask, L), T=T, H=H, W=W, tile_h=th, tile_w=tw, text_len=text_len,
                 text_before=int(text_before), scale=float(scale), sparsity=float(sparsity), policy=policy,
                 cdf_threshold=float(cdf_threshold), **selection_attributes(policy, float(sparsity), n_tiles))


def translation_table() -> dict:
    """For ``torch.onnx.export(..., custom_translation_table=...)``."""
    import torch

    from . import export  # noqa: F401  (registers draftopt::draft_attention_onnx)

    return {torch.ops.draftopt.draft_attention_onnx.default: draft_attention_translation}


def function_protos() -> list:
    """The ONNX functions of the draftopt domain (DraftAttention and the TileSums it calls)."""
    return [TileSums.to_function_proto(), DraftAttention.to_function_proto()]


def add_onnx_functions(model):
    """Make an exported model run without a plug-in: attach the draftopt functions its
    ``draftopt.DraftAttention`` nodes call, and rewrite bool ``Where`` nodes (``bool_where_as_logic``).

    ``model``: a torch.onnx ``ONNXProgram``, an ``onnx_ir.Model`` or an ``onnx.ModelProto`` (changed in place
    and returned). The functions import the model's standard opset (their ops mean the same in opsets 18 and
    later).
    """
    import onnx
    import onnx_ir as ir

    target = getattr(model, "model", model)  # ONNXProgram -> its ir.Model
    if isinstance(target, onnx.ModelProto):
        converted = ir.serde.deserialize_model(target)
        add_onnx_functions(converted)
        target.CopyFrom(ir.serde.serialize_model(converted))
        return model
    if not isinstance(target, ir.Model):
        raise ValueError(f"add_onnx_functions expects an ONNXProgram, an onnx_ir.Model or an onnx.ModelProto, "
                         f"got {type(model).__name__}")
    version = target.opset_imports.get("", 18)
    for proto in function_protos():
        _set_opset(proto, version)
        function = ir.serde.deserialize_function(proto)
        target.functions.setdefault(function.identifier(), function)
    target.opset_imports.setdefault(DOMAIN, DOMAIN_VERSION)
    bool_where_as_logic(target)
    return model


def _set_opset(proto, version: int) -> None:
    for imp in proto.opset_import:
        if imp.domain == "":
            imp.version = max(imp.version, version)


def bool_where_as_logic(model) -> int:
    """Rewrite ``Where`` nodes over bool tensors (torch.onnx's translation of ``masked_fill`` on a bool mask,
    as HunyuanVideo builds its attention mask) as ``Or(And(c, x), And(Not(c), y))``: onnxruntime's CPU
    provider has no bool ``Where`` kernel, so such a file would not load. Same values; returns the count."""
    import onnx_ir as ir

    graph = getattr(model, "model", model).graph
    count = 0
    for node in list(graph):
        out = node.outputs[0] if node.outputs else None
        if node.domain != "" or node.op_type != "Where" or out is None or out.dtype != ir.DataType.BOOL:
            continue
        c, x, y = node.inputs
        not_c = ir.node("Not", [c])
        take_x = ir.node("And", [c, x])
        take_y = ir.node("And", [not_c.outputs[0], y])
        either = ir.node("Or", [take_x.outputs[0], take_y.outputs[0]], name=node.name)
        new = [not_c, take_x, take_y, either]
        ir.convenience.replace_nodes_and_values(graph, node, [node], new, [out], [either.outputs[0]])
        count += 1
    return count
