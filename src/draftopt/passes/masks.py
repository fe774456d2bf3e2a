"""Attention masks the pass can honour exactly, recognised in the graph.

Two forms:

- a **key padding mask**: its query dimension is 1 (``[B, 1, 1, L]``, as
  HunyuanVideo 1.0 passes); the kernels take it as their additive key bias;
- the **outer product of one padding vector** (``query x key padding`` in the report):
  ``m[:, None, :, None] & m[:, None, None, :]`` for a vector ``m`` of
  ``[B or 1, L]``, as HunyuanVideo 1.5 builds its self-attention mask::

      m1 = m.view(B, 1, 1, L).repeat(1, 1, L, 1)
      mask = (m1 & m1.transpose(2, 3)).bool()

  Row ``i`` of such a mask is ``m`` itself where ``m[i]`` is True (key
  padding) and all False where it is not: those query rows attend to nothing,
  and SDPA gives them a fixed value (0 on torch 2.13's CPU and math paths).
  The rewrite takes ``m`` as key padding and sets those rows to what SDPA
  gives (``masked_row_value``).

A mask's *values* cannot be checked at run time without a host sync, so the
outer-product form is accepted only when the graph proves it: the mask is an
AND (``&``, ``torch.logical_and``, ``*`` of bools) of two operands that are
each a chain of the declared broadcast views below applied to **one** node,
one operand laying the vector along the query axis and broadcast along the
key axis, the other the reverse.

Declared broadcast views (each maps the input's axes to the output's; an
axis of size 1, or copies of one, carries no index of the vector):
``unsqueeze``, ``squeeze``, ``view`` / ``reshape`` that only add or drop
size-1 axes, ``expand`` / ``expand_as`` / ``broadcast_to``, ``repeat`` of
size-1 axes, ``transpose`` / ``swapaxes`` / ``permute`` / ``.mT``, indexing
with ``None`` / ``:`` / ``...`` only, and bool-to-bool casts (``.bool()``,
``.to(torch.bool)``) and ``contiguous``.

Example:
    >>> form = outer_product_mask(site.mask, B=2, heads=24, L=L)
    >>> form.vector, form.axes, form.batch
    (<fx.Node getitem>, (0, None, 1), 2)
"""

from __future__ import annotations

import functools
import logging
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .sites import example_value

log = logging.getLogger(__name__)

# The AND of two bool masks, in the spellings Dynamo records.
_AND_FUNCTIONS = {operator.and_, torch.bitwise_and, torch.logical_and, operator.mul, torch.mul}
_AND_METHODS = {"__and__", "bitwise_and", "logical_and", "mul", "__mul__"}
# Only logical_and reads its operands as truth values: `&` and `*` of integers are not an AND.
_LOGICAL = {torch.logical_and, "logical_and"}
_MAX_CHAIN = 32  # views followed back from one operand; a real mask needs a handful


@dataclass
class OuterProductMask:
    """A mask proven to be ``v[b, h, i] & v[b, h, j]`` for one vector ``v``, read off the graph.

    ``axes`` (batch, heads, sequence) name the vector node's axes that index the
    mask's batch, head and sequence axes (None: the mask is broadcast there).
    """

    vector: fx.Node  # the node both operands are views of
    axes: tuple  # (batch axis or None, head axis or None, sequence axis) of ``vector``
    batch: int  # the vector's batch size (1: broadcast)
    heads: int  # its head count (1: broadcast)
    nodes: list = field(default_factory=list)  # the matched mask-building nodes (erased when left unused)


def _axis(d, ndim: int):
    return d % ndim if isinstance(d, int) else None


def _ints(args) -> tuple | None:
    """Sizes given as ``f(x, 2, 3)`` or ``f(x, (2, 3))``; None when not all ints."""
    items = tuple(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else tuple(args)
    return items if all(isinstance(d, int) for d in items) else None


def _strip_ones(dims: list, shape) -> list:
    """Size-1 axes carry no index of the vector."""
    return [None if shape[i] == 1 else d for i, d in enumerate(dims)]


def _map_view(n: fx.Node, dims: list, in_shape, out_shape) -> list | None:
    """The vector axes of ``n``'s output, given those of its input (``dims``); None: not a declared view."""
    name = n.target if n.op == "call_method" else getattr(n.target, "__name__", None)
    args = list(n.args[1:])
    in_nd, out_nd = len(in_shape), len(out_shape)
    if name in ("contiguous", "clone", "bool", "to", "type"):
        return list(dims)
    if name == "unsqueeze":
        d = _axis(args[0] if args else n.kwargs.get("dim"), out_nd)
        return None if d is None else dims[:d] + [None] + dims[d:]
    if name == "squeeze":
        drop = set(range(in_nd)) if not args else {_axis(a, in_nd) for a in (_ints(args) or ())}
        return [d for i, d in enumerate(dims) if not (i in drop and in_shape[i] == 1)]
    if name in ("view", "reshape"):
        # Only adding or dropping size-1 axes: the other sizes must match in order.
        big_in = [i for i in range(in_nd) if in_shape[i] != 1]
        big_out = [i for i in range(out_nd) if out_shape[i] != 1]
        if [in_shape[i] for i in big_in] != [out_shape[i] for i in big_out]:
            return None
        out = [None] * out_nd
        for i, j in zip(big_in, big_out):
            out[j] = dims[i]
        return out
    if name in ("expand", "expand_as", "broadcast_to"):
        return [None] * (out_nd - in_nd) + list(dims)  # only size-1 axes grow, and those are None already
    if name == "repeat":
        reps = _ints(args)
        if reps is None or len(reps) < in_nd:
            return None
        lead = len(reps) - in_nd
        if any(r != 1 and in_shape[i] != 1 for i, r in enumerate(reps[lead:])):
            return None  # tiling the vector itself: no outer product of it
        return [None] * lead + list(dims)
    if name in ("transpose", "swapaxes", "swapdims"):
        a, b = (_axis(x, in_nd) for x in args[:2]) if len(args) >= 2 else (None, None)
        if a is None or b is None:
            return None
        out = list(dims)
        out[a], out[b] = out[b], out[a]
        return out
    if name == "permute":
        perm = _ints(args)
        if perm is None or len(perm) != in_nd:
            return None
        return [dims[p % in_nd] for p in perm]
    if name == "getattr" and args == ["mT"]:
        return dims[:-2] + [dims[-1], dims[-2]]
    if name == "getitem":
        return _map_index(args[0] if args else None, dims)
    return None


def _map_index(idx, dims: list) -> list | None:
    """Indexing with None, full slices and at most one Ellipsis (no element is dropped)."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    full = slice(None, None, None)
    if sum(i is Ellipsis for i in idx) > 1 or any(i is not None and i is not Ellipsis and i != full for i in idx):
        return None
    n_full = sum(1 for i in idx if i is not None and i is not Ellipsis)
    if n_full > len(dims):
        return None
    out, rest = [], list(dims)
    for i in idx:
        if i is None:
            out.append(None)
        elif i is Ellipsis:
            take = len(dims) - n_full  # the axes no slice names
            out, rest = out + rest[:take], rest[take:]
        else:
            out.append(rest.pop(0))
    return out + rest


def _is_view_node(n: fx.Node) -> bool:
    if n.op == "call_method":
        return n.target in ("contiguous", "clone", "unsqueeze", "squeeze", "view", "reshape", "expand",
                            "expand_as", "broadcast_to", "repeat", "transpose", "swapaxes", "swapdims", "permute",
                            "bool", "to", "type")
    if n.op == "call_function":
        return n.target in (torch.unsqueeze, torch.squeeze, torch.reshape, torch.transpose, torch.swapaxes,
                            torch.permute, torch.broadcast_to, operator.getitem, getattr)
    return False


def _bool_cast_of_bool(n: fx.Node) -> bool:
    """A cast whose input and output are bool (a value-preserving no-op); other casts end a chain."""
    if not (n.op == "call_method" and n.target in ("bool", "to", "type")) or not n.args:
        return n.op == "call_method" and n.target in ("contiguous", "clone")
    src, out = example_value(n.args[0]), example_value(n)
    return src is not None and out is not None and src.dtype == torch.bool and out.dtype == torch.bool


def _vector_view(n: fx.Node) -> tuple[fx.Node, list, list]:
    """(base, axes, chain): ``n`` as a chain of declared views of ``base``; ``axes[i]`` is the base axis that
    output axis ``i`` indexes (None: broadcast there). Where a step turns out to be no declared view (a
    reshape that merges axes), that step becomes the base and the views above it are followed from there."""
    chain, node = [], n
    while len(chain) < _MAX_CHAIN and isinstance(node, fx.Node) and _is_view_node(node) and node.args \
            and isinstance(node.args[0], fx.Node):
        if node.op == "call_method" and node.target in ("bool", "to", "type") and not _bool_cast_of_bool(node):
            break  # a cast that changes the values' type: the vector is what it produces
        chain.append(node)
        node = node.args[0]
    base, val = node, example_value(node)
    if not isinstance(val, torch.Tensor):
        return n, [], []
    dims, shape, used = _strip_ones(list(range(val.dim())), val.shape), tuple(val.shape), []
    for step in reversed(chain):
        out_val = example_value(step)
        if not isinstance(out_val, torch.Tensor):
            return n, [], []
        mapped = _map_view(step, dims, shape, tuple(out_val.shape))
        if mapped is None or len(mapped) != out_val.dim():
            base, mapped, used = step, list(range(out_val.dim())), []
        else:
            used.append(step)
        dims, shape = _strip_ones(mapped, out_val.shape), tuple(out_val.shape)
    return base, dims, used


def _and_operands(n: fx.Node) -> tuple | None:
    if n.op == "call_function" and n.target in _AND_FUNCTIONS and len(n.args) == 2:
        return n.target, n.args[0], n.args[1]
    if n.op == "call_method" and n.target in _AND_METHODS and len(n.args) == 2:
        return n.target, n.args[0], n.args[1]
    return None


def outer_product_mask(mask: fx.Node, B: int, heads: int, L: int) -> OuterProductMask | None:
    """The vector ``v`` when the graph proves ``mask[b, h, i, j] = v[b, h, i] & v[b, h, j]``, else None.

    ``mask`` is an SDPA ``attn_mask`` node for ``[B, heads, L, L]`` attention.

    Example (HunyuanVideo 1.5's construction, ``m`` of ``[B, L]``):
        >>> m1 = m.view(B, 1, 1, L).repeat(1, 1, L, 1); mask = (m1 & m1.transpose(2, 3)).bool()
        >>> outer_product_mask(mask_node, B, heads, L).axes
        (0, None, 1)
    """
    if not isinstance(mask, fx.Node):
        return None
    out = example_value(mask)
    if not isinstance(out, torch.Tensor) or out.dtype != torch.bool or out.dim() > 4 or tuple(out.shape[-2:]) != (L, L):
        return None
    full = (1,) * (4 - out.dim()) + tuple(out.shape)
    if full[0] not in (1, B) or full[1] not in (1, heads):
        return None
    nodes, node = [], mask
    while _bool_cast_of_bool(node) and isinstance(node.args[0], fx.Node):  # (m1 & m2).bool()
        nodes.append(node)
        node = node.args[0]
    found = _and_operands(node)
    if found is None:
        return None
    op, a, b = found
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    va, vb = example_value(a), example_value(b)
    if not isinstance(va, torch.Tensor) or not isinstance(vb, torch.Tensor):
        return None
    if op not in _LOGICAL and (va.dtype != torch.bool or vb.dtype != torch.bool):
        return None  # `&` / `*` of integers is bitwise / arithmetic, not the AND of two padding masks
    (base_a, dims_a, chain_a), (base_b, dims_b, chain_b) = _vector_view(a), _vector_view(b)
    if base_a is not base_b or not dims_a or not dims_b:
        return None
    dims_a, dims_b = [None] * (4 - len(dims_a)) + dims_a, [None] * (4 - len(dims_b)) + dims_b
    if len(dims_a) != 4 or len(dims_b) != 4:
        return None
    key, query = (dims_a, dims_b) if dims_a[3] is not None else (dims_b, dims_a)
    seq = key[3]
    if seq is None or key[2] is not None or query[3] is not None or query[2] != seq or key[:2] != query[:2]:
        return None
    batch_axis, head_axis = key[0], key[1]
    base_val = example_value(base_a)
    used = {d for d in (batch_axis, head_axis, seq) if d is not None}
    if {i for i, s in enumerate(base_val.shape) if s != 1} != used or base_val.shape[seq] != L:
        return None  # an axis of the vector the mask does not index (cannot happen through the views above)
    nb = base_val.shape[batch_axis] if batch_axis is not None else 1
    nh = base_val.shape[head_axis] if head_axis is not None else 1
    if nb not in (1, B) or nh not in (1, heads):
        return None
    chain = [node, *nodes, *[n for n in chain_a + chain_b if n is not base_a]]
    return OuterProductMask(base_a, (batch_axis, head_axis, seq), nb, nh, list(dict.fromkeys(chain)))


# -- what SDPA gives a query row that attends to nothing ---------------------------------------------------------
MASKED_ROW_VALUES = ("zero", "nan", "mean_v")


@functools.lru_cache(maxsize=None)
def masked_row_value(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """What ``scaled_dot_product_attention`` returns for a query row whose bool mask is all False, on this
    device and dtype: "zero" (torch 2.13's CPU paths, its math path), "nan" (a -inf softmax), "mean_v" (a
    finite fill: uniform weights over every key), or None (none of these, or the probe failed).

    Found once per (device, dtype, head dim) by running SDPA on a tiny input (at compile time, never in the
    compiled graph), so the rewrite gives such rows what the model's own SDPA gives them.
    """
    try:
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily(), torch.no_grad():
            gen = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(1, 1, 16, head_dim, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
            mask = torch.ones(1, 1, 16, 16, dtype=torch.bool, device=device)
            mask[..., 0, :] = False
            mask[..., :, 5] = False  # key padding too, as in a real mask
            row = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)[0, 0, 0].float().cpu()
            mean = v[0, 0].float().mean(0).cpu()
    except Exception as e:  # an exotic device or backend: the site stays dense, with this reason
        log.info("draftopt: probing SDPA's fully masked rows on %s %s failed: %s", device, dtype, e)
        return None
    if bool((row == 0).all()):
        return "zero"
    if bool(row.isnan().all()):
        return "nan"
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    if torch.allclose(row, mean, atol=tol, rtol=tol):
        return "mean_v"
    return None
