"""Context parallelism: which sites each rank may rewrite.

draftopt's block selection is per (batch, head) over the whole sequence, so a
rank can run it exactly when it holds the whole sequence for its heads:
Ulysses (diffusers' ``ContextParallelConfig(ulysses_degree=...)``), where q, k
and v each arrive through an all-to-all right before attention. Ring attention
(keys gathered shard by shard) and any other sequence-sharded attention see
only part of the sequence: those sites are skipped with a reason.
"""

from __future__ import annotations

import operator
from collections import deque

import torch
import torch.fx as fx

# Ops that move or reshape data without mixing positions of other tokens in.
_VIEW_METHODS = {"permute", "transpose", "reshape", "view", "flatten", "unflatten", "contiguous", "chunk",
                 "split", "to", "type_as", "reshape_as", "view_as", "float", "half", "bfloat16"}
_VIEW_FUNCS = {operator.getitem, torch.reshape, torch.permute, torch.transpose, torch.flatten, torch.chunk,
               torch.split, torch.cat}


def is_collective(n: fx.Node) -> bool:
    return n.op == "call_function" and "c10d_functional" in str(n.target)


def graph_has_collectives(graph: fx.Graph) -> bool:
    return any(is_collective(n) for n in graph.nodes)


def collective_source(node: fx.Node, max_nodes: int = 32) -> str | None:
    """The collective (e.g. 'all_to_all_single') that feeds ``node`` through view-like ops only."""
    seen, todo = set(), deque([node])
    while todo and len(seen) < max_nodes:
        n = todo.popleft()
        if n in seen or not isinstance(n, fx.Node):
            continue
        seen.add(n)
        if is_collective(n) and "wait_tensor" not in str(n.target):
            return str(n.target).split(".")[1]
        view_like = (n.op == "call_method" and n.target in _VIEW_METHODS) or (
            n.op == "call_function" and (n.target in _VIEW_FUNCS or "wait_tensor" in str(n.target)))
        if view_like:
            todo.extend(n.all_input_nodes)
    return None


def context_parallel_kind(q: fx.Node, k: fx.Node, v: fx.Node) -> tuple[str | None, str]:
    """("ulysses", "") when q, k, v all come from all-to-alls; (None, reason) otherwise."""
    sources = [collective_source(n) for n in (q, k, v)]
    if all(s and s.startswith("all_to_all") for s in sources):
        return "ulysses", ""
    if any(s and s.startswith("all_gather") for s in sources):
        return None, ("ring attention: keys/values are gathered from other ranks shard by shard; each call sees "
                      "part of the sequence (use diffusers' ulysses_degree instead of ring_degree)")
    return None, ("context parallel graph, but q/k/v do not all arrive through an all-to-all: this rank may hold "
                  f"only part of the sequence (sources: q={sources[0]}, k={sources[1]}, v={sources[2]})")
