"""Tile layouts (kernels/layout.py): "strips" and "auto", and that strips are exactly the flattened grid."""

import pytest
import torch

import draftopt
from draftopt.kernels import Geometry, draft_attention, tile_layout
from draftopt.passes import DraftConfig

from ..helpers import CPU_OPTIONS
from ..models import ToyDiT, toy_inputs


@pytest.mark.parametrize("grid, sparsity, adaptive, name, padding", [
    ((21, 45, 80), 0.9, False, "strips", 0.0311),  # Wan2.1 720p: 8x16 pads 6.7%
    ((21, 45, 80), 0.8, False, "strips", 0.0311),  # the threshold itself
    ((21, 45, 80), 0.0, False, "strips", 0.0311),  # dense: no selection, the padding alone decides
    ((21, 45, 80), 0.0, True, "8x16", 0.0667),     # 0 now, but a run-time sparsity may be set higher later
    ((21, 45, 80), 0.79, False, "8x16", 0.0667),   # strips select worse at lower sparsity
    ((21, 45, 80), 0.5, False, "8x16", 0.0667),
    ((21, 45, 80), 0.9, True, "8x16", 0.0667),     # run-time sparsity or the guard: it may fall below 0.8
    ((21, 30, 52), 0.9, False, "strips", 0.0667),  # Wan2.1 480p: 8x16 pads 31%
    ((33, 48, 80), 0.9, False, "8x16", 0.0),       # HunyuanVideo 720p: tiles cover it (strips too): 8x16
    ((2, 16, 30), 0.9, False, "8x16", 0.0667),     # a tie with strips (480 tokens = 3.75 strips): 8x16 kept
    ((2, 12, 64), 0.9, False, "strips", 0.0),      # 4 x 32 would cover it too, but is an explicit choice only
])
def test_auto_takes_strips_where_they_pad_less_and_select_well(grid, sparsity, adaptive, name, padding):
    lay = tile_layout(grid, "auto", sparsity, adaptive)
    assert (lay.name, lay.auto, lay.padding) == (name, True, padding)
    assert lay.label == f"{name} (auto)"
    geom = lay.geometry()
    assert geom.n_visual == grid[0] * grid[1] * grid[2]
    assert geom.padded_len / geom.n_visual - 1 == pytest.approx(padding, abs=1e-4)


def test_explicit_tiles_ignore_the_sparsity():
    for sparsity, adaptive in ((0.5, False), (0.9, True), (0.9, False)):
        assert tile_layout((21, 45, 80), "strips", sparsity, adaptive).name == "strips"
        assert tile_layout((21, 45, 80), (4, 32), sparsity, adaptive).name == "4x32"


def test_strips_see_the_grid_flattened():
    lay = tile_layout((21, 45, 80), "strips")
    assert (lay.grid, lay.tile, lay.name, lay.auto) == ((21, 1, 3600), (1, 128), "strips", False)
    g = lay.geometry(512, "end")
    assert (g.n_tiles, g.n_text_blocks) == (21 * 29, 4)
    assert tile_layout((21, 45, 80), (8, 16)).name == "8x16"


@pytest.mark.parametrize("tile", ["strip", "tiles", 7, (3, 5), (8, 16, 1), None])
def test_bad_tiles_are_refused(tile):
    with pytest.raises(ValueError, match="tile"):
        tile_layout((2, 8, 8), tile)
    with pytest.raises(ValueError, match="tile"):
        DraftConfig(tile=tile)


def test_config_keeps_the_choice():
    assert DraftConfig().tile == "auto"
    assert DraftConfig(tile="strips").tile == "strips"
    assert DraftConfig(tile="auto").tile == "auto"
    assert DraftConfig(tile=[4, 32]).tile == (4, 32)


@pytest.mark.parametrize("sparsity", [0.0, 0.6])
def test_draft_attention_strips_is_the_flattened_geometry(sparsity):
    """tile="strips" runs the same ops as the (T, 1, H*W) grid with (1, 128) tiles, so it is exact at
    sparsity 0 and the same computation at any sparsity."""
    torch.manual_seed(0)
    grid, text = (3, 13, 27), 9
    q, k, v = (torch.randn(1, 2, 3 * 13 * 27 + text, 32, dtype=torch.float64) for _ in range(3))
    got, mask = draft_attention(q, k, v, grid, text_len=text, tile="strips", sparsity=sparsity, return_mask=True)
    flat = draft_attention(q, k, v, (3, 1, 13 * 27), text_len=text, tile=(1, 128), sparsity=sparsity)
    torch.testing.assert_close(got, flat, atol=0, rtol=0)
    assert mask.geometry == Geometry((3, 1, 351), (1, 128), text, "end")
    if sparsity == 0.0:
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        torch.testing.assert_close(got, want)


@torch.no_grad()
@pytest.mark.parametrize("tile, cell", [("strips", "strips"), ("auto", "strips (auto)")])
def test_optimize_with_strips(tile, cell):
    """The pass builds the strip geometry, reports the choice, and at sparsity 0 matches the model."""
    toy = ToyDiT(layers=1).eval()
    latent, text = toy_inputs(latent=(2, 10, 50))  # 5 x 25 tokens a frame: strips pad 2.4%, tiles >= 105%
    want = toy(latent, text)
    opts = dict(CPU_OPTIONS, tile=tile)
    model = draftopt.optimize(toy, sparsity=0.0, **opts)
    torch.testing.assert_close(model(latent, text), want, atol=2e-5, rtol=2e-5)
    rec = draftopt.report(model).rewritten[0]
    assert (rec.grid, rec.tile, rec.layout) == ((2, 5, 25), (1, 128), cell)
    assert cell in str(draftopt.report(model))


@torch.no_grad()
@pytest.mark.parametrize("options, cell", [
    (dict(sparsity=0.9), "strips (auto)"),
    (dict(sparsity=0.5), "8x16 (auto)"),
    (dict(sparsity=0.9, max_error=0.05), "8x16 (auto)"),
    (dict(sparsity=0.9, runtime_sparsity=True), "8x16 (auto)"),
], ids=["0.9", "0.5", "guard", "runtime"])
def test_default_tiling_follows_the_sparsity(options, cell):
    """optimize's default tile ("auto") on a grid 8 x 16 tiles pad: strips at a fixed sparsity >= 0.8, else
    tiles; the report names the choice."""
    toy = ToyDiT(layers=1).eval()
    latent, text = toy_inputs(latent=(2, 10, 50))
    defaults = {key: value for key, value in CPU_OPTIONS.items() if key != "tile"}
    model = draftopt.optimize(toy, **defaults, **options)
    model(latent, text)
    rec = draftopt.report(model).rewritten[0]
    assert rec.layout == cell
    assert rec.tile == ((1, 128) if cell.startswith("strips") else (8, 16))
