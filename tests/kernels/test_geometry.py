import pytest
import torch

from draftopt.kernels import Geometry
from draftopt.kernels.geometry import (TEXT_POSITIONS, original_to_permuted_index, permuted_source_index,
                                       tile_token_counts)

from . import reference as ref

GEOMETRIES = [
    Geometry((3, 13, 27), (8, 16), 0, "end"),
    Geometry((3, 13, 27), (8, 16), 7, "start"),
    Geometry((1, 8, 16), (8, 16), 77, "end"),
    Geometry((2, 5, 9), (4, 4), 33, "end"),
    Geometry((1, 3, 3), (4, 8), 256, "start"),
    Geometry((2, 5, 9), (4, 4), 19 + 33, 19),  # text on both sides (FramePack: history, grid, text)
    Geometry((1, 8, 16), (8, 16), 256 + 128, 256),  # both sides in whole blocks
]


@pytest.mark.parametrize("g", GEOMETRIES, ids=str)
def test_permutation_is_a_bijection_onto_real_rows(g):
    src = permuted_source_index(g)
    inv = original_to_permuted_index(g)
    assert src.numel() == g.padded_len and inv.numel() == g.seq_len
    assert torch.equal(src[inv], torch.arange(g.seq_len))
    assert int((src >= 0).sum()) == g.seq_len
    # every block holds tokens of exactly one tile (or text); a tile's row a * tw + b
    # holds the token at (a, b) of its box, text blocks hold their tokens first
    ids = ref.tile_of_tokens(g.grid, g.tile, g.text_len, g.text_position)
    blocks = src.reshape(g.n_blocks, g.block)
    (_, H, W), (th, tw) = g.grid, g.tile
    r = torch.arange(g.block)
    for b in range(g.n_blocks):
        real = blocks[b][blocks[b] >= 0]
        want = b if b < g.n_tiles else -1
        assert torch.all(ids[real] == want)
        if b < g.n_tiles:
            tok = blocks[b] - g.visual_offset
            h, w = (tok // W) % H, tok % W
            ok = blocks[b] >= 0
            assert torch.equal(h[ok] % th, (r // tw)[ok]) and torch.equal(w[ok] % tw, (r % tw)[ok])
        else:
            assert torch.all(blocks[b][: real.numel()] >= 0)


@pytest.mark.parametrize("g", GEOMETRIES, ids=str)
def test_tile_counts_match_reference(g):
    ids = ref.tile_of_tokens(g.grid, g.tile, g.text_len, g.text_position)
    want = torch.bincount(ids[ids >= 0], minlength=g.n_tiles).float()
    assert torch.equal(tile_token_counts(g), want)


def test_text_on_both_sides():
    """History before the grid and text after it: each side padded to whole blocks, a 0 or full count
    stored as "end" / "start" (one geometry, one spelling)."""
    g = Geometry((2, 5, 9), (4, 4), 19 + 33, 19)
    assert (g.prefix_len, g.suffix_len, g.is_split) == (19, 33, True)
    assert (g.n_prefix_blocks, g.n_text_blocks, g.visual_offset, g.suffix_offset) == (2, 5, 19, 19 + 90)
    assert g.padded_len == (g.n_tiles + 5) * 16 and g.has_text_padding
    assert Geometry.from_op_args(*g.op_args()) == g and g.op_args()[-1] == 19
    assert "text 19 before and 33 after" in str(g)
    assert Geometry((2, 5, 9), (4, 4), 7, 7) == Geometry((2, 5, 9), (4, 4), 7, "start")
    assert Geometry((2, 5, 9), (4, 4), 7, 0) == Geometry((2, 5, 9), (4, 4), 7, "end")
    with pytest.raises(ValueError, match="text_before"):
        Geometry.from_op_args(2, 5, 9, 4, 4, 7, True)


def test_sizes():
    g = Geometry((3, 13, 27), tile=(8, 16), text_len=7, text_position="start")
    assert (g.n_tiles, g.block, g.n_text_blocks, g.seq_len, g.padded_len) == (12, 128, 1, 1060, 1664)
    assert (g.visual_offset, g.text_offset) == (7, 0)
    assert Geometry.from_op_args(*g.op_args()) == g


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(grid=(0, 4, 4)), "grid"),
        (dict(grid=(2, 4)), "grid"),
        (dict(grid=(2, 4, 4), tile=(3, 5)), r"tile \(3, 5\)"),
        (dict(grid=(2, 4, 4), tile=(2, 4)), "power of two"),
        (dict(grid=(2, 4, 4), tile=(32, 16)), "512 tokens"),
        (dict(grid=(2, 4, 4), text_len=-1), "text_len"),
        (dict(grid=(2, 4, 4), text_position="middle"),
         r"text_position must be one of \('start', 'end'\) or a count .*, got 'middle'"),
        (dict(grid=(2, 4, 4), text_len=5, text_position=6), r"text_position=6 .* text_len is 5"),
        (dict(grid=(2, 4, 4), text_len=5, text_position=-1), r"text_position=-1"),
        (dict(grid=(2, 4, 4), text_position="auto"), "got 'auto'"),  # "auto" is the pass's, not a geometry
    ],
)
def test_bad_geometry_raises_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Geometry(**kwargs)


def test_wrong_sequence_length_names_the_numbers():
    g = Geometry((2, 4, 4), (4, 4), text_len=3)
    with pytest.raises(ValueError, match="length 40 .* 35"):
        g.check_seq_len(40)


def test_text_positions():
    assert TEXT_POSITIONS == ("start", "end")
    assert [Geometry((1, 4, 4), (4, 4), 3, p).visual_offset for p in TEXT_POSITIONS] == [3, 0]
