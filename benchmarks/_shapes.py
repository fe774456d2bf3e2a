"""The real-model attention shapes the op-level benchmarks share (issue #5)."""

from draftopt.kernels import Geometry

SHAPES = {  # name: (heads, (T, H, W) video tokens after patching, text tokens at the end)
    "wan1.3b-480p": (12, (21, 30, 52), 0),
    "wan14b-720p": (40, (21, 45, 80), 0),
    "hunyuan720p": (24, (33, 48, 80), 256),
}


def shape(name: str) -> tuple[int, Geometry]:
    """(heads, geometry with 8x16 tiles) of a named shape."""
    heads, grid, text_len = SHAPES[name]
    return heads, Geometry(grid, (8, 16), text_len, "end")
