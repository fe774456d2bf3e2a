"""Find attention sites in a Dynamo FX graph.

Two forms count as attention:

- ``F.scaled_dot_product_attention`` (``torch._C._nn.scaled_dot_product_attention``),
  positional or keyword arguments (diffusers' dispatcher passes keywords, its
  ``AttnProcessor2_0`` positional q, k, v);
- explicit ``softmax(q @ k^T [* s | / s] [+ mask], dim=-1) @ v``.

Each becomes an ``AttentionSite``: the q, k, v (and mask) nodes, the scale,
the node whose output the attention result is, and the module path.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F

_SDPA_TARGETS = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention,
                 torch.ops.aten.scaled_dot_product_attention.default}
_MATMUL_TARGETS = {operator.matmul, torch.matmul}
_SOFTMAX_FUNCS = {torch.softmax, F.softmax, torch.ops.aten._softmax.default}
# Ops that change a tensor's dtype or memory layout but not its values per position.
_PASSTHROUGH_METHODS = {"to", "type_as", "float", "half", "bfloat16", "contiguous"}


@dataclass
class AttentionSite:
    """One attention call found in a graph."""

    node: fx.Node  # its output is the attention result [B, heads, L, D]
    kind: str  # "sdpa" or "explicit"
    q: fx.Node
    k: fx.Node
    v: fx.Node
    mask: fx.Node | None = None
    scale: float | None = None  # None: 1/sqrt(D)
    dropout_p: float = 0.0
    is_causal: bool = False
    enable_gqa: bool = False
    name: str = ""
    extra_nodes: list = field(default_factory=list)  # explicit form: the nodes it replaces


def _is_sdpa_node(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target in _SDPA_TARGETS


def _is_softmax_node(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target in _SOFTMAX_FUNCS) or (
        n.op == "call_method" and n.target == "softmax")


def _is_matmul_node(n) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in _MATMUL_TARGETS


def example_value(n):
    """The FakeTensor Dynamo recorded for a node (or None)."""
    if not isinstance(n, fx.Node):
        return None
    return n.meta.get("example_value", n.meta.get("val"))


def module_path(n: fx.Node) -> str:
    """'blocks.0.attn1' from the innermost nn_module_stack entry (Dynamo's L['self']... form)."""
    stack = n.meta.get("nn_module_stack") or {}
    if not stack:
        return n.name
    path = list(stack.values())[-1][0]
    path = re.sub(r"^L\['self'\]", "", path)
    path = re.sub(r"\.__dict__\['_modules'\]\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    # hooks (diffusers' context parallel, accelerate) wrap forward in closures:
    # blocks.0.forward.func.__closure__.0.cell_contents.forward.__self__.attn1 -> blocks.0.attn1
    path = re.sub(r"\.__closure__\.\d+\.cell_contents", "", path)
    path = re.sub(r"\.(forward|func|__self__)(?=\.|$)", "", path)
    return path.lstrip(".") or n.name


def _sdpa_site(n: fx.Node) -> AttentionSite:
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
    args = dict(zip(names, n.args))
    args.update(n.kwargs)
    return AttentionSite(
        node=n, kind="sdpa", q=args["query"], k=args["key"], v=args["value"],
        mask=args.get("attn_mask"), scale=args.get("scale"), dropout_p=args.get("dropout_p", 0.0),
        is_causal=args.get("is_causal", False), enable_gqa=args.get("enable_gqa", False),
    )


def _softmax_dim(n: fx.Node):
    dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
    return dim


def _transposed_last_two(n) -> fx.Node | None:
    """k if n is k.transpose(-2, -1) (any spelling), else None."""
    if not isinstance(n, fx.Node):
        return None
    val = example_value(n)
    nd = val.dim() if val is not None else 4
    if n.op == "call_method" and n.target == "transpose" or n.op == "call_function" and n.target is torch.transpose:
        dims = {d % nd for d in n.args[1:3]}
        return n.args[0] if dims == {nd - 1, nd - 2} else None
    if n.op == "call_function" and n.target is getattr and n.args[1] == "mT":
        return n.args[0]
    if n.op == "call_method" and n.target == "permute":
        perm = list(n.args[1]) if isinstance(n.args[1], (list, tuple)) else list(n.args[1:])
        want = list(range(nd - 2)) + [nd - 1, nd - 2]
        return n.args[0] if [p % nd for p in perm] == want else None
    return None


def _explicit_site(softmax: fx.Node) -> AttentionSite | None:
    """Match softmax(q @ k^T * scale [+ mask], -1) [.to(dtype)] @ v around a softmax node."""
    dim = _softmax_dim(softmax)
    val = example_value(softmax)
    if dim is None or val is None or dim % val.dim() != val.dim() - 1:
        return None
    replaced = [softmax]
    # downstream: optional dtype cast, then the PV matmul with the probabilities on the left
    users = list(softmax.users)
    probs = softmax
    if len(users) == 1 and users[0].op == "call_method" and users[0].target in _PASSTHROUGH_METHODS:
        probs = users[0]
        replaced.append(probs)
        users = list(probs.users)
    if len(users) != 1 or not _is_matmul_node(users[0]) or users[0].args[0] is not probs:
        return None
    out = users[0]
    v = out.args[1]
    # upstream: [add mask] <- [mul/div scale] <- q @ k^T
    x = softmax.args[0]
    mask = None
    if isinstance(x, fx.Node) and x.op == "call_function" and x.target in (operator.add, torch.add) and len(x.users) == 1:
        replaced.append(x)
        x, mask = x.args[0], x.args[1]
        if not isinstance(mask, fx.Node):
            return None
    scale = 1.0
    if isinstance(x, fx.Node) and x.op == "call_function" and x.target in (operator.mul, operator.truediv, torch.mul) \
            and isinstance(x.args[1], (int, float)) and len(x.users) == 1:
        replaced.append(x)
        scale = float(x.args[1]) if x.target is not operator.truediv else 1.0 / float(x.args[1])
        x = x.args[0]
    if not _is_matmul_node(x) or len(x.users) != 1:
        return None
    k = _transposed_last_two(x.args[1])
    if k is None:
        return None
    replaced += [x, x.args[1]]  # the transpose goes too, unless something else reads it
    return AttentionSite(node=out, kind="explicit", q=x.args[0], k=k, v=v, mask=mask, scale=scale,
                         extra_nodes=replaced)


def find_attention_sites(graph: fx.Graph) -> list[AttentionSite]:
    """Every SDPA call and explicit softmax attention, in graph order."""
    sites = []
    for n in graph.nodes:
        site = _sdpa_site(n) if _is_sdpa_node(n) else _explicit_site(n) if _is_softmax_node(n) else None
        if site is not None:
            site.name = module_path(site.node if site.kind == "sdpa" else n)
            sites.append(site)
    return sites


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
