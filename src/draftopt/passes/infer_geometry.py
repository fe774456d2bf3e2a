"""Work out a site's token geometry from the graph: grid, text length and position.

The grid (T, H, W tokens) comes from, in order:

1. ``latent_shape`` / patch size (the patch size from ``patch_size``, else the
   stride of the graph's patch embedding, else the model's own config as
   ``optimize`` read it, else 1: the pipeline packed tokens);
2. the output shape of a patch embedding in the graph: a Conv3d ([B, C, T, H, W])
   or a Conv2d applied per frame ([B*T, C, H, W]);
3. the input of a Linear patch embedding over packed patches, [B, T, H, W, K]
   (Cosmos, Kandinsky 5).

Text tokens are the rest of the sequence; their position is found by following
q back to the ``torch.cat`` that joined text and video tokens.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from .sites import example_value

_CONV3D = {torch.conv3d, F.conv3d, torch.ops.aten.convolution.default}
_CONV2D = {torch.conv2d, F.conv2d}
_LINEAR = {torch._C._nn.linear, F.linear}
_CAT = {torch.cat, torch.concat, torch.concatenate}


@dataclass(frozen=True)
class GridSource:
    """A candidate token grid and where it came from (for reports)."""

    grid: tuple  # (T, H, W); for a per-frame Conv2d, T is None until the batch is known
    source: str
    frames_from_batch: int | None = None  # Conv2d: output batch = B * T

    def resolve(self, batch: int) -> tuple[int, int, int] | None:
        if self.frames_from_batch is None:
            return self.grid
        if self.frames_from_batch % batch:
            return None
        return (self.frames_from_batch // batch, *self.grid[1:])


def normalize_patch(patch) -> tuple[int, int, int]:
    """int p -> (1, p, p); (ph, pw) -> (1, ph, pw); (pt, ph, pw) as is."""
    if isinstance(patch, int):
        return (1, patch, patch)
    patch = tuple(patch)
    return (1, *patch) if len(patch) == 2 else patch


def _conv_nodes(graph: fx.Graph):
    for n in graph.nodes:
        if n.op == "call_function" and (n.target in _CONV3D or n.target in _CONV2D):
            out = example_value(n)
            if out is not None and out.dim() in (4, 5):
                yield n, out


def _conv_stride(n: fx.Node) -> tuple[int, int, int]:
    stride = n.kwargs.get("stride", n.args[3] if len(n.args) > 3 else 1)
    return normalize_patch(stride if not isinstance(stride, int) else (stride,) * (3 if example_value(n).dim() == 5 else 2))


def _patch_linears(graph: fx.Graph):
    """The first Linear applied to a 5-D [B, T, H, W, K] tensor: a patch embedding over packed patches,
    whose input's middle dims are the token grid (later ones see the same grid)."""
    for n in graph.nodes:
        if n.op == "call_function" and n.target in _LINEAR and n.args:
            x = example_value(n.args[0])
            if x is not None and x.dim() == 5 and is_static(x.shape):
                return [(n, x)]
    return []


def grid_sources(graph: fx.Graph, latent_shape=None, patch_size=None, model_patch=None) -> list[GridSource]:
    """Candidate grids for the sites of this graph, most trusted first.

    A given ``latent_shape`` is checked against the latent the graph's patch
    embedding is called with: a mismatch (another resolution, a wrong shape)
    is a ValueError naming both, never a wrong grid. ``model_patch`` is the
    patch size the model's config gives (``optimize`` reads it), used when
    neither ``patch_size`` nor a patch convolution in the graph says.

    Example:
        >>> [s.grid for s in grid_sources(gm.graph, latent_shape=(2, 16, 32), model_patch=(1, 2, 2))]
        [(2, 8, 16)]
    """
    # A convolution with one output position runs per patch (JoyImageEditPlus: [B * N, C, 1, 2, 2]): no grid.
    convs = [(n, out) for n, out in _conv_nodes(graph) if not _one_position(out)]
    linears = _patch_linears(graph)
    if latent_shape is not None:
        return [_from_latent(tuple(latent_shape), patch_size, model_patch, convs, linears)]
    sources = []
    for n, out in convs:
        if any(not isinstance(d, int) for d in out.shape):
            continue
        if out.dim() == 5:
            sources.append(GridSource(tuple(out.shape[2:]), f"output of patch embedding {n.name} {tuple(out.shape)}"))
        else:
            sources.append(GridSource((None, *out.shape[2:]), f"output of per-frame patch embedding {n.name} "
                                      f"{tuple(out.shape)}", frames_from_batch=out.shape[0]))
    sources += [GridSource(tuple(x.shape[1:4]), f"input of Linear patch embedding {n.name} {tuple(x.shape)}")
                for n, x in linears]
    return sources


def _one_position(out) -> bool:
    return all(isinstance(d, int) for d in out.shape[2:]) and math.prod(out.shape[2:]) == 1


def _patch(patch_size, model_patch, convs) -> tuple[tuple, str]:
    """The patch size and where it came from: the option, the graph's patch convolution, the model's config."""
    if patch_size is not None:
        return normalize_patch(patch_size), "from patch_size"
    if convs:
        return _conv_stride(convs[0][0]), f"from the stride of {convs[0][0].name}"
    if model_patch is not None:
        return normalize_patch(model_patch), "from model.config"
    return (1, 1, 1), "(no patch embedding in the graph, no patch_size, no model.config patch)"


def _from_latent(latent_shape: tuple, patch_size, model_patch, convs, linears) -> GridSource:
    patch, how = _patch(patch_size, model_patch, convs)
    if any(d % p for d, p in zip(latent_shape, patch)):
        raise ValueError(
            f"latent_shape {latent_shape} is not divisible by the patch size {patch} ({how}); "
            "pass the latent tensor's (T, H, W) and, if needed, patch_size=(pt, ph, pw)"
        )
    grid = tuple(d // p for d, p in zip(latent_shape, patch))
    if convs:
        _check_latent(convs[0][0], latent_shape)
        checked = f"checked against {convs[0][0].name}'s input"
    elif linears:
        _check_linear_grid(*linears[0], grid, latent_shape, patch)
        checked = f"checked against {linears[0][0].name}'s input"
    else:
        checked = "unverified: no patch embedding in this graph to check it against"
    return GridSource(grid, f"latent_shape {latent_shape} / patch {patch} {how}; {checked}")


def _check_linear_grid(linear: fx.Node, x, grid: tuple, latent_shape: tuple, patch: tuple) -> None:
    """ValueError unless the Linear patch embedding's input [B, T, H, W, K] has the grid latent_shape / patch."""
    seen = tuple(x.shape[1:4])
    if seen != grid:
        raise ValueError(
            f"latent_shape {latent_shape} / patch {patch} = grid {grid} does not match the token grid this graph "
            f"is called with: the patch embedding {linear.name} gets {tuple(x.shape)} (T, H, W = "
            f"{'x'.join(map(str, seen))}). Pass latent_shape=None to read the grid of every call off the graph, "
            "or the latent_shape (and patch_size) of this call"
        )


def _check_latent(conv: fx.Node, latent_shape: tuple) -> None:
    """ValueError unless the patch embedding's input has the given latent (T, H, W) (H, W per frame)."""
    x = example_value(conv.args[0]) if conv.args else None
    if x is None or not is_static(x.shape):
        return
    seen = tuple(x.shape[2:]) if x.dim() == 5 else (None, *x.shape[2:])
    if any(s is not None and s != d for s, d in zip(seen, latent_shape)):
        shown = "x".join("?" if s is None else str(s) for s in seen)
        raise ValueError(
            f"latent_shape {latent_shape} does not match the latent this graph is called with: the patch "
            f"embedding {conv.name} gets {tuple(x.shape)} (T, H, W = {shown}). Pass latent_shape=None to read "
            "the grid of every call off the graph, or the latent_shape of this call"
        )


def text_before_from_graph(q: fx.Node, n_visual: int, text_len: int, max_nodes: int = 4096,
                           history_first: bool = False) -> int | None:
    """How many of the ``text_len`` tokens off the grid come before it, read off the concatenations that
    build q's sequence; None where they do not tell.

    The nearest concatenation of the whole sequence on q's path (breadth first) names the part that is the
    grid ([text, video], [video, text]: HunyuanVideo, CogVideoX, Helios' [history, video]), or the one part
    that holds it with more tokens, whose own concatenation is then followed the same way (FramePack:
    [[history, video], text], the history concatenated before the first block). ``max_nodes`` bounds each
    search: a later block reaches the model's input concatenation through the blocks before it.

    ``history_first``: the model's hidden-state stream is [history, video] (FramePack, Helios, by their
    class): where the graph does not show that stream's own concatenation (a block graph after a graph
    break gets it as an input), its tokens beside the grid come before the grid.
    """
    return _grid_offset(q, n_visual + text_len, n_visual, max_nodes, 0, history_first)


def _grid_offset(node: fx.Node, length: int, n_visual: int, max_nodes: int, depth: int,
                 history_first: bool) -> int | None:
    found = _nearest_cat(node, length, max_nodes) if depth <= 8 else None
    if found is None:
        return length - n_visual if history_first else None
    parts, sizes = found
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    grid_at = {starts[i] for i in range(len(sizes)) for j in range(i, len(sizes)) if sum(sizes[i:j + 1]) == n_visual}
    if grid_at:  # a run of parts that is the grid; two candidate places: ambiguous
        return grid_at.pop() if len(grid_at) == 1 else None
    holders = [i for i, n in enumerate(sizes) if n > n_visual]
    if len(holders) != 1:
        return None
    (i,) = holders
    inner = _grid_offset(parts[i], sizes[i], n_visual, max_nodes, depth + 1, history_first)
    return None if inner is None else starts[i] + inner


def _nearest_cat(start: fx.Node, length: int, max_nodes: int):
    """(parts, sizes) of the nearest producer of ``start`` (itself included) that concatenates ``length`` tokens."""
    seen, todo = set(), deque([start])
    while todo and len(seen) < max_nodes:
        n = todo.popleft()
        if n in seen or not isinstance(n, fx.Node):
            continue
        seen.add(n)
        if n.op == "call_function" and n.target in _CAT:
            found = _cat_parts(n)
            if found is not None and sum(found[1]) == length:
                return found
        todo.extend(a for a in n.all_input_nodes if a.op != "placeholder")
    return None


def _cat_parts(cat: fx.Node):
    parts = cat.args[0] if cat.args else cat.kwargs.get("tensors")
    dim = cat.kwargs.get("dim", cat.args[1] if len(cat.args) > 1 else 0)
    if not isinstance(parts, (list, tuple)) or len(parts) < 2 or not all(isinstance(p, fx.Node) for p in parts):
        return None
    vals = [example_value(p) for p in parts]
    if any(v is None for v in vals):
        return None
    sizes = [v.shape[dim] for v in vals]
    return (list(parts), sizes) if all(isinstance(n, int) for n in sizes) else None


def is_static(shape) -> bool:
    return all(isinstance(d, int) for d in shape)


def n_tokens(grid) -> int:
    return math.prod(grid)
