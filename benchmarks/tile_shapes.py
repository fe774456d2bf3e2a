"""Tile shapes for grids no 128-token tile covers: attention error and padding of each, on video-like inputs.

    python benchmarks/tile_shapes.py [--images astronaut coffee] [--sparsities 0.5 0.8 0.9] [--quick]
                                     [--grids 2x45x80 2x30x52]

Wan2.1-14B 720p is 45 x 80 tokens a frame: 8 x 16 tiles pad 3 of every 48 rows (6.7%). This compares, at
equal sparsity (policy "mass"), each tiling's error against float64 dense attention on the fidelity
benchmark's inputs (_fidelity_inputs.py; D 64, 2 heads a case, 4 head kinds):

- tiles 8 x 16 (the default) and 16 x 8;
- strips per frame (``tile="strips"``): 128 consecutive tokens in raster order within a frame (grid
  (T, 1, H*W), tile (1, 128)): each strip spans 128 / W rows, only a frame's last strip is padded;
- strips global (not an option): 128 consecutive tokens in raster order over the whole clip (grid
  (1, 1, T*H*W)): only the clip's last strip is padded, and the tile-major order is the original order;
- ``tile="auto"``: the tiling ``draftopt.kernels.layout`` picks (the name says which).

Padding = padded rows / real tokens: the work the kernel does for nothing. On these small grids padding is
larger than at 720p (at 21 x 45 x 80: 6.7% for 8 x 16, 3.1% per frame, 0.06% global). CPU, about a minute;
save_table appends the rows to benchmarks/results/tile_shapes.jsonl.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from tabulate import tabulate

from draftopt.kernels import draft_attention, tile_layout

if __package__:
    from . import _results
    from ._fidelity_inputs import HEAD_KINDS, build_cases
else:
    import _results
    from _fidelity_inputs import HEAD_KINDS, build_cases

# partial tiles at two edges; whole 8 x 16 tiles; 30 x 52 (Wan2.1 480p) at half size
GRIDS = [(3, 21, 37), (4, 24, 32), (3, 15, 26)]
HEADERS = ["grid", "sparsity", "tiling", "padding %", "mean error", "error / 8x16's"]


def tilings(T: int, H: int, W: int, sparsity: float):
    """(name, grid, tile) of each tiling of a T x H x W grid: the draft_attention call's arguments ("auto"
    depends on the sparsity)."""
    auto = tile_layout((T, H, W), "auto", sparsity).name
    return [("tiles 8x16", (T, H, W), (8, 16)), ("tiles 16x8", (T, H, W), (16, 8)),
            ("strips per frame", (T, H, W), "strips"), ("strips global", (1, 1, T * H * W), (1, 128)),
            (f"auto (= {auto})", (T, H, W), "auto")]


def _grid(text: str) -> tuple[int, int, int]:
    parts = text.split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"a grid is TxHxW with positive integers, e.g. 2x45x80; got {text!r}")
    return tuple(int(p) for p in parts)


def main(argv=None) -> list[list]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", nargs="+", default=["astronaut", "coffee"])
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.8, 0.9])
    ap.add_argument("--quick", action="store_true", help="one image, grid 2 x 9 x 17, sparsity 0.5 (tests)")
    ap.add_argument("--grids", nargs="+", type=_grid, metavar="TxHxW",
                    help=f"grids to compare (default {' '.join('x'.join(map(str, g)) for g in GRIDS)}); "
                         "2x45x80 is two frames of Wan2.1-14B 720p")
    args = ap.parse_args(argv)
    grids = [(2, 9, 17)] if args.quick else args.grids or GRIDS
    images, sparsities = (args.images[:1], [0.5]) if args.quick else (args.images, args.sparsities)
    errors = defaultdict(list)
    with torch.no_grad():
        cases = build_cases(images, [0], [(g, (8, 16)) for g in grids], [64], list(HEAD_KINDS))
        for case in cases:
            q, k, v = case.q, case.k, case.v
            dense = torch.softmax((q.double() @ k.double().transpose(-1, -2)) * 64 ** -0.5, -1) @ v.double()
            for s in sparsities:
                for name, grid, tile in tilings(*case.geom.grid, s):
                    out = draft_attention(q, k, v, grid, tile=tile, sparsity=s)
                    err = ((out.double() - dense).norm() / dense.norm()).item()
                    errors[case.meta["grid"], s, name].append(err)
    rows = []
    for (grid, s, name), errs in sorted(errors.items()):
        gr, t = [(gr, t) for n, gr, t in tilings(*map(int, grid.split("x")), s) if n == name][0]
        g = tile_layout(gr, t, s).geometry()
        base = errors[grid, s, "tiles 8x16"]
        rows.append([grid, s, name, round(100 * (g.padded_len / g.seq_len - 1), 2), round(sum(errs) / len(errs), 4),
                     round(sum(errs) / sum(base), 3)])
    _results.save_table("tile_shapes", HEADERS, rows, dict(device=f"cpu ({torch.get_num_threads()} threads)",
                                                          images=images, quick=args.quick), out=_results.RESULTS)
    print(tabulate(rows, headers=HEADERS))
    return rows


if __name__ == "__main__":
    main()
