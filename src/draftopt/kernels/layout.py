"""Which tiling a site uses: ``tile=(th, tw)``, ``"strips"`` or ``"auto"`` (``DraftConfig.tile``).

A tile is one kernel block, and a tile the grid does not fill is computed in
full: its padding rows cost what real rows cost. 720p Wan2.1 frames are
45 x 80 tokens; no power-of-two tile height divides 45, so 8 x 16 tiles pad
6.7% of the rows (Wan2.1 480p, 30 x 52: 31%).

- ``"strips"``: each frame's tokens in raster order, cut into 128-token strips
  (at 80 tokens a row, a strip is 1.6 rows). The grid is seen as
  ``(T, 1, H * W)`` with ``(1, 128)`` tiles, so every op, kernel and mask
  works unchanged; only each frame's last strip is partial (45 x 80: 3.1%
  padding; 30 x 52: 6.7%).
- ``"auto"`` (``DraftConfig``'s default): strips where they pad fewer rows than
  8 x 16 tiles and select about as well, else 8 x 16. Strips select better
  at high sparsity and worse at low: the error ratio strips / 8 x 16 was
  0.63-1.04 at sparsity 0.8-0.9 over seven grids and image sets (0.75 at
  Wan2.1-14B 720p's 45 x 80 frames), but up to 1.21-1.30 at 0.5 on smaller
  or 480p grids (``benchmarks/tile_shapes.py``, docs/design.md "Tile
  layouts"). So strips need a sparsity of 0 (dense: no selection) or at least
  ``STRIPS_MIN_SPARSITY``, fixed at compile time: where it moves at run time
  (``runtime_sparsity``, a schedule) or the ``max_error`` guard may keep more
  pairs, 8 x 16 stays.
  16 x 8, 4 x 32 and 2 x 64 are explicit choices only (16 x 8, the least
  padding of them at 30 x 52, selected worse there: 1.02-1.28).

Example:
    >>> tile_layout((21, 45, 80), "auto", sparsity=0.9)
    TileLayout(grid=(21, 1, 3600), tile=(1, 128), name='strips', auto=True, padding=0.0311)
    >>> tile_layout((21, 45, 80), "auto", sparsity=0.5).name  # strips select worse at low sparsity
    '8x16'
    >>> tile_layout((33, 48, 80), "auto", sparsity=0.9).name  # tiles cover the grid: no padding to save
    '8x16'
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .geometry import Geometry, _as_tuple, _is_int

STRIP_TOKENS = 128
TILE_CHOICES = ("strips", "auto")
# "auto" takes strips over 8 x 16 only at sparsity 0 or from here up (the module doc says why).
STRIPS_MIN_SPARSITY = 0.8


@dataclass(frozen=True)
class TileLayout:
    """A site's tiling: the ``grid`` and ``tile`` its Geometry takes, a ``name`` for the report ("8x16",
    "strips"), whether ``auto`` chose it, and the ``padding`` (fraction of the visual rows, rounded)."""

    grid: tuple[int, int, int]
    tile: tuple[int, int]
    name: str
    auto: bool = False
    padding: float = 0.0

    def geometry(self, text_len: int = 0, text_position: str | int = "end") -> Geometry:
        return Geometry(self.grid, self.tile, text_len, text_position)

    @property
    def label(self) -> str:
        """The report's tile cell: "8x16", "strips", "strips (auto)"."""
        return f"{self.name} (auto)" if self.auto else self.name


def check_tile(tile) -> tuple | str:
    """``tile`` as ``DraftConfig`` keeps it: a (th, tw) pair that is one kernel block, or "strips" /
    "auto"; a ValueError that names the value otherwise."""
    if isinstance(tile, str):
        if tile not in TILE_CHOICES:
            raise ValueError(f"tile must be (th, tw), 'strips' or 'auto', got {tile!r}")
        return tile
    pair = _as_tuple(tile)
    if pair is None or len(pair) != 2 or not all(_is_int(d) for d in pair):
        raise ValueError(f"tile must be (th, tw), 'strips' or 'auto', got {tile!r}")
    Geometry((1, 1, 1), pair)  # raises ValueError for a tile that is not one kernel block
    return tuple(int(d) for d in pair)


def _padding(grid, tile) -> float:
    T, H, W = grid
    th, tw = tile
    padded = math.ceil(H / th) * th * math.ceil(W / tw) * tw
    return padded / (H * W) - 1.0


def _layout(grid, tile, auto: bool) -> TileLayout:
    T, H, W = grid
    if tile == "strips":
        flat, strip = (T, 1, H * W), (1, STRIP_TOKENS)
        return TileLayout(flat, strip, "strips", auto, round(_padding(flat, strip), 4))
    return TileLayout(tuple(grid), tuple(tile), f"{tile[0]}x{tile[1]}", auto, round(_padding(grid, tile), 4))


def tile_layout(grid, tile, sparsity: float = 0.0, adaptive: bool = False) -> TileLayout:
    """The tiling of a (T, H, W) grid for ``tile`` ((th, tw), "strips" or "auto": the module doc).
    ``sparsity`` and ``adaptive`` (the kept pairs may change at run time: a run-time sparsity or the
    ``max_error`` guard) matter to "auto" only."""
    tile = check_tile(tile)
    grid = tuple(int(d) for d in grid)
    if tile != "auto":
        return _layout(grid, tile, False)
    tiles, strips = _layout(grid, (8, 16), True), _layout(grid, "strips", True)
    selects_well = not adaptive and (sparsity == 0.0 or sparsity >= STRIPS_MIN_SPARSITY)
    return strips if strips.padding < tiles.padding and selects_well else tiles
