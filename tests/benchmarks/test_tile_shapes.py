"""benchmarks/tile_shapes.py on its --quick config, in process, on the CPU."""

import argparse

import pytest

pytest.importorskip("skimage")

from benchmarks import tile_shapes  # noqa: E402


def test_every_tiling_has_a_row_with_its_padding(tmp_path, monkeypatch):
    monkeypatch.setattr(tile_shapes._results, "RESULTS", str(tmp_path))
    rows = {r[2]: dict(zip(tile_shapes.HEADERS, r)) for r in tile_shapes.main(["--quick"])}
    assert set(rows) == {"tiles 8x16", "tiles 16x8", "strips per frame", "strips global", "auto (= 8x16)"}
    # 2 x 9 x 17 = 306 tokens: 8x16 tiles pad to 2 x 2 x 2 tiles of 128 rows, global strips to 3 blocks
    assert rows["tiles 8x16"]["padding %"] == round(100 * (1024 / 306 - 1), 2)
    assert rows["strips global"]["padding %"] == round(100 * (384 / 306 - 1), 2)
    assert rows["tiles 8x16"]["error / 8x16's"] == 1.0
    # 9 x 17 = 153 tokens a frame: strips pad each frame to 256, 8x16 tiles to 512; but at sparsity 0.5 auto
    # keeps 8x16 tiles (strips select worse there)
    assert rows["strips per frame"]["padding %"] == round(100 * (512 / 306 - 1), 2)
    assert rows["auto (= 8x16)"]["mean error"] == rows["tiles 8x16"]["mean error"]
    assert all(0 < r["mean error"] < 1 for r in rows.values())


def test_grids_are_parsed_and_bad_ones_named():
    assert tile_shapes._grid("2x45x80") == (2, 45, 80)
    for bad in ("2x45", "2x0x80", "axbxc"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"got '{bad}'"):
            tile_shapes._grid(bad)
