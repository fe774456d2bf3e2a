"""Token geometry of a video attention site, and the tile-major token order.

A video DiT's sequence is a ``T x H x W`` grid of visual tokens (frames x
rows x columns, after patch embedding) and ``text_len`` tokens that are not on
the grid: text (HunyuanVideo, CogVideoX), history latents (FramePack, Helios),
image conditioning. They sit before the grid, after it, or both
(``text_position``: "start", "end", or the number before the grid), and they
are dense rows and columns of the attention, whatever they hold; the code
calls them all "text". draftopt splits each frame into tiles of ``th x tw``
tokens; one tile is one kernel block of ``th * tw`` tokens.

The *permuted* (tile-major) layout used by the sparse kernel is::

    [tile 0 | ... | tile S-1 | text blocks before the grid | text blocks after it ]   each BLOCK rows

Inside a tile, row ``a * tw + b`` holds the token at tile row ``a``, column
``b`` (the tile's box in row-major order); in a partial tile at the right or
bottom edge the positions that fall outside the grid are padding rows. So
every tile's rows sit at fixed offsets from its first token, and the
attention kernel can address a tile in place with one scalar base per tile.
Text tokens keep their order; the text before the grid and the text after it
are each padded to whole blocks, so no block holds both (a kernel that reads
blocks in place reads one contiguous range per block).

Example:
    >>> g = Geometry((3, 13, 27), tile=(8, 16), text_len=7, text_position="start")
    >>> g.n_tiles, g.block, g.n_text_blocks, g.seq_len, g.padded_len
    (12, 128, 1, 1060, 1664)
    >>> g = Geometry((9, 8, 16), tile=(8, 16), text_len=435 + 256, text_position=435)  # FramePack-like
    >>> g.prefix_len, g.suffix_len, g.n_text_blocks
    (435, 256, 6)
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

TEXT_POSITIONS = ("start", "end")
# tl.dot needs every block dimension >= 16; above 256 tokens per tile the
# kernel's [BLOCK, BLOCK] score tile no longer fits in registers.
MIN_BLOCK, MAX_BLOCK = 16, 256


def _as_tuple(x) -> tuple | None:
    try:
        return tuple(x)
    except TypeError:  # an int, None, ...: the caller names the value
        return None


def _is_int(x) -> bool:
    """A Python or numpy integer (not a bool)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


@dataclass(frozen=True)
class Geometry:
    """Grid, tile and text layout of one attention site.

    Args:
        grid: ``(T, H, W)`` visual tokens (frames, rows, columns).
        tile: ``(th, tw)`` tokens per tile; ``th * tw`` must be a power of two
            in [16, 256] (one kernel block).
        text_len: number of tokens not on the grid (text, history, conditioning; 0 for none).
        text_position: where they are: ``"start"`` (all before the grid: CogVideoX, Helios'
            history), ``"end"`` (all after it: HunyuanVideo), or an int, how many of them come
            before the grid, the rest after it (FramePack: history before, text after). An
            int of 0 or ``text_len`` is stored as "end" or "start".
    """

    grid: tuple[int, int, int]
    tile: tuple[int, int] = (8, 16)
    text_len: int = 0
    text_position: str | int = "end"

    def __post_init__(self):
        grid, tile = _as_tuple(self.grid), _as_tuple(self.tile)
        if grid is None or len(grid) != 3 or not all(_is_int(d) and d > 0 for d in grid):
            raise ValueError(
                f"grid must be three positive ints (T, H, W) of visual tokens, got {self.grid!r}"
            )
        if tile is None or len(tile) != 2 or not all(_is_int(d) and d > 0 for d in tile):
            raise ValueError(f"tile must be two positive ints (th, tw), got {self.tile!r}")
        block = tile[0] * tile[1]
        if not (_is_pow2(block) and MIN_BLOCK <= block <= MAX_BLOCK):
            raise ValueError(
                f"tile {tile} has {block} tokens; th * tw must be a power of two between "
                f"{MIN_BLOCK} and {MAX_BLOCK} (one kernel block), e.g. (8, 16) or (4, 16)"
            )
        if not _is_int(self.text_len) or self.text_len < 0:
            raise ValueError(f"text_len must be an int >= 0, got {self.text_len!r}")
        object.__setattr__(self, "text_position", _normal_position(self.text_position, int(self.text_len)))
        object.__setattr__(self, "grid", tuple(int(d) for d in grid))
        object.__setattr__(self, "tile", tuple(int(d) for d in tile))
        object.__setattr__(self, "text_len", int(self.text_len))

    # -- sizes ---------------------------------------------------------------
    @property
    def n_visual(self) -> int:
        T, H, W = self.grid
        return T * H * W

    @property
    def seq_len(self) -> int:
        return self.n_visual + self.text_len

    @property
    def tiles_hw(self) -> tuple[int, int]:
        (_, H, W), (th, tw) = self.grid, self.tile
        return math.ceil(H / th), math.ceil(W / tw)

    @property
    def n_tiles(self) -> int:
        nh, nw = self.tiles_hw
        return self.grid[0] * nh * nw

    @property
    def has_visual_padding(self) -> bool:
        """Whether edge tiles hold padding rows (H or W not a multiple of the tile)."""
        (_, H, W), (th, tw) = self.grid, self.tile
        return H % th != 0 or W % tw != 0

    @property
    def block(self) -> int:
        return self.tile[0] * self.tile[1]

    @property
    def prefix_len(self) -> int:
        """Text tokens before the grid."""
        p = self.text_position
        return self.text_len if p == "start" else 0 if p == "end" else p

    @property
    def suffix_len(self) -> int:
        """Text tokens after the grid."""
        return self.text_len - self.prefix_len

    @property
    def is_split(self) -> bool:
        """Whether text lies on both sides of the grid (two ranges of the original sequence)."""
        return self.prefix_len > 0 and self.suffix_len > 0

    @property
    def n_prefix_blocks(self) -> int:
        return math.ceil(self.prefix_len / self.block)

    @property
    def n_text_blocks(self) -> int:
        return self.n_prefix_blocks + math.ceil(self.suffix_len / self.block)

    @property
    def has_text_padding(self) -> bool:
        """Whether a text block holds padding rows."""
        return self.prefix_len % self.block != 0 or self.suffix_len % self.block != 0

    @property
    def n_blocks(self) -> int:
        return self.n_tiles + self.n_text_blocks

    @property
    def padded_len(self) -> int:
        return self.n_blocks * self.block

    @property
    def visual_offset(self) -> int:
        """Index of the first visual token in the original sequence."""
        return self.prefix_len

    @property
    def text_offset(self) -> int:
        """Index of the first text token in the original sequence (of the text after the grid when
        the text is split: see ``text_segments``)."""
        return 0 if self.prefix_len else self.n_visual

    @property
    def suffix_offset(self) -> int:
        """Index of the first text token after the grid."""
        return self.prefix_len + self.n_visual

    # -- op arguments ----------------------------------------------------------
    def op_args(self) -> tuple[int, int, int, int, int, int, int]:
        """(T, H, W, th, tw, text_len, text_before): how every op takes a geometry, in this order."""
        return (*self.grid, *self.tile, self.text_len, self.prefix_len)

    @classmethod
    def from_op_args(cls, T, H, W, th, tw, text_len, text_before) -> "Geometry":
        if isinstance(text_before, bool):  # a bool would read as a count of 0 or 1
            raise ValueError(f"text_before is the number of text tokens before the grid, got {text_before!r}")
        return cls((T, H, W), (th, tw), text_len, text_before)

    def check_seq_len(self, seq_len: int, what: str = "sequence") -> None:
        if seq_len != self.seq_len:
            T, H, W = self.grid
            raise ValueError(
                f"{what} length {seq_len} does not match the geometry: grid {T}x{H}x{W} = "
                f"{self.n_visual} visual tokens + {self.text_len} text tokens = {self.seq_len}; "
                f"pass the grid (latent shape / patch size) and text_len of this attention"
            )

    def __str__(self) -> str:
        T, H, W = self.grid
        th, tw = self.tile
        nh, nw = self.tiles_hw
        return f"{T}x{H}x{W} tokens in {T}x{nh}x{nw} tiles of {th}x{tw}{self._text_words()}"

    def _text_words(self) -> str:
        if not self.text_len:
            return ""
        if self.is_split:
            return f", text {self.prefix_len} before and {self.suffix_len} after"
        return f", text {self.text_len} at {self.text_position}"


def _normal_position(position, text_len: int) -> str | int:
    """"start" / "end" as given; a count of text tokens before the grid checked, 0 / all as "end" / "start"."""
    if _is_int(position):
        if not 0 <= position <= text_len:
            raise ValueError(f"text_position={position} text tokens before the grid, but text_len is {text_len}; "
                             f"pass a count in [0, {text_len}], or 'start' / 'end'")
        return "start" if position == text_len and text_len else "end" if position == 0 else int(position)
    if position not in TEXT_POSITIONS:
        raise ValueError(f"text_position must be one of {TEXT_POSITIONS} or a count of text tokens before the "
                         f"grid, got {position!r}")
    return position


# -- token order ---------------------------------------------------------------
def tile_coords(s, geom: Geometry):
    """Visual tile index ``s`` (int or tensor) -> (frame, tile row, tile column) in the grid of tiles.

    The one definition of the tile order: frames first, then tile rows, then tile columns.
    """
    nh, nw = geom.tiles_hw
    return s // (nh * nw), (s // nw) % nh, s % nw


def permuted_source_index(geom: Geometry, device=None) -> torch.Tensor:
    """For each row of the permuted layout, the original token index (or -1 for padding).

    int64 tensor of ``geom.padded_len`` rows; built from arange arithmetic on
    ``device``, so it never synchronizes with the host.
    """
    _, H, W = geom.grid
    th, tw = geom.tile
    blk = geom.block
    t, hi, wi = tile_coords(torch.arange(geom.n_tiles, device=device)[:, None], geom)
    r = torch.arange(blk, device=device)[None, :]
    h, w = hi * th + r // tw, wi * tw + r % tw  # the token's row and column in its frame
    src = geom.visual_offset + t * (H * W) + h * W + w
    vis = torch.where((h < H) & (w < W), src, -1).reshape(-1)
    return torch.cat([vis, *(_text_rows(n, start, blk, device) for n, start in text_segments(geom))])


def text_segments(geom: Geometry) -> list[tuple[int, int]]:
    """(count, first index in the original sequence) of each range of text tokens, in the permuted order:
    the text before the grid, then the text after it (empty ranges left out)."""
    parts = [(geom.prefix_len, 0), (geom.suffix_len, geom.suffix_offset)]
    return [(n, start) for n, start in parts if n]


def _text_rows(n: int, start: int, blk: int, device) -> torch.Tensor:
    j = torch.arange(math.ceil(n / blk) * blk, device=device)
    return torch.where(j < n, start + j, -1)


def original_to_permuted_index(geom: Geometry, device=None) -> torch.Tensor:
    """For each original token, its row in the permuted layout (int64, ``seq_len`` rows).

    Computed arithmetically (no boolean indexing), so it never synchronizes.
    """
    (_, H, W), (th, tw) = geom.grid, geom.tile
    nh, nw = geom.tiles_hw
    j = torch.arange(geom.n_visual, device=device)
    t, h, w = j // (H * W), (j // W) % H, j % W
    hi, wi = h // th, w // tw
    tile = t * (nh * nw) + hi * nw + wi
    vis = tile * geom.block + (h - hi * th) * tw + (w - wi * tw)
    first = geom.n_tiles * geom.block
    before = first + torch.arange(geom.prefix_len, device=device)
    after = first + geom.n_prefix_blocks * geom.block + torch.arange(geom.suffix_len, device=device)
    return torch.cat([before, vis, after])


def tile_token_counts(geom: Geometry, device=None) -> torch.Tensor:
    """Real tokens in each visual tile (float32, ``n_tiles``): the pooling divisor."""
    (_, H, W), (th, tw) = geom.grid, geom.tile
    _, hi, wi = tile_coords(torch.arange(geom.n_tiles, device=device), geom)
    rows = torch.clamp(H - hi * th, max=th)
    cols = torch.clamp(W - wi * tw, max=tw)
    return (rows * cols).to(torch.float32)
