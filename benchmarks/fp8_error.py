"""FP8 attention's error on video-DiT-like inputs: precision="fp8" against bf16, both against float64 dense.

    python benchmarks/fp8_error.py [--images astronaut coffee] [--sparsities 0 0.5 0.9] [--quick]

The inputs are benchmarks/fidelity.py's (_fidelity_inputs.py: panning clips of real photographs,
patch-embedded; spatial / temporal / local / content heads; 2 heads a case). Per case and sparsity:

- dense: float64 softmax attention of q, k, v;
- bf16: ``draft_attention`` on bf16 q, k, v (the PyTorch path: float32 products, a bf16 output, as the
  kernels accumulate);
- fp8: the same with ``precision="fp8"``: the PyTorch path simulates the Gluon kernel's numerics (e4m3 q per
  block, k minus its mean and v per head, P as e4m3(256 exp(s - max))). tests/kernels/test_fp8.py bounds the
  kernel against this simulation on the GPU.

Error = ||O - O_dense|| / ||O_dense|| over one case's heads (relative L2). Prints, per head kind and
sparsity, the mean errors and the geometric-mean and largest ratio fp8 / bf16 over the cases (issue 17's
bound: at most 1.5), a table last; save_table appends the rows to benchmarks/results/fp8_error.jsonl.
Runs on the CPU in about a minute (--quick: seconds).
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict

import torch
from tabulate import tabulate

from draftopt.kernels import draft_attention

if __package__:  # imported as benchmarks.fp8_error (tests)
    from . import _results
    from ._fidelity_inputs import HEAD_KINDS, build_cases
else:  # python benchmarks/fp8_error.py: the script's folder is on sys.path, as for every benchmark
    import _results
    from _fidelity_inputs import HEAD_KINDS, build_cases

GRIDS = [((4, 24, 32), (8, 16)), ((3, 21, 37), (8, 16))]  # whole tiles; partial tiles at two edges
QUICK = dict(images=["astronaut"], dims=[64], grids=[((2, 12, 16), (4, 8))], sparsities=[0.0, 0.5])
HEADERS = ["kind", "sparsity", "cases", "bf16 error", "fp8 error", "fp8 / bf16 (geo mean)", "fp8 / bf16 (max)"]


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


def case_errors(case, sparsity: float) -> tuple[float, float]:
    """(bf16 error, fp8 error) of one case at one sparsity."""
    q, k, v = case.q, case.k, case.v
    dense = torch.softmax((q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5, -1) @ v.double()
    run = dict(grid=case.geom.grid, tile=case.geom.tile, sparsity=sparsity)
    q16, k16, v16 = (t.bfloat16() for t in (q, k, v))
    return (rel_err(draft_attention(q16, k16, v16, **run), dense),
            rel_err(draft_attention(q16, k16, v16, precision="fp8", **run), dense))


def summarize(errors: dict) -> list[list]:
    rows = []
    for (kind, s), pairs in sorted(errors.items()):
        ratios = [f / b for b, f in pairs]
        rows.append([kind, s, len(pairs), round(sum(b for b, _ in pairs) / len(pairs), 4),
                     round(sum(f for _, f in pairs) / len(pairs), 4),
                     round(math.exp(sum(map(math.log, ratios)) / len(ratios)), 3), round(max(ratios), 3)])
    return rows


def main(argv=None) -> list[list]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", nargs="+", default=["astronaut", "coffee"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--dims", nargs="+", type=int, default=[64, 128])
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.0, 0.5, 0.9])
    ap.add_argument("--quick", action="store_true", help=f"tiny config (tests): {QUICK}")
    args = ap.parse_args(argv)
    grids = GRIDS
    if args.quick:
        args.images, args.dims, grids, args.sparsities = QUICK["images"], QUICK["dims"], QUICK["grids"], \
            QUICK["sparsities"]
    from tqdm import tqdm

    n = len(args.images) * len(args.seeds) * len(grids) * len(args.dims) * len(HEAD_KINDS)
    errors = defaultdict(list)
    with torch.no_grad():
        for case in tqdm(build_cases(args.images, args.seeds, grids, args.dims, list(HEAD_KINDS)), total=n,
                         desc="fp8 error", disable=args.quick):
            for s in args.sparsities:
                errors[case.meta["kind"], s].append(case_errors(case, s))
                errors["all", s].append(errors[case.meta["kind"], s][-1])
    rows = summarize(errors)
    meta = dict(device=f"cpu ({torch.get_num_threads()} threads)", images=args.images, seeds=args.seeds,
                dims=args.dims, grids=[f"{'x'.join(map(str, g))}/{'x'.join(map(str, t))}" for g, t in grids],
                quick=args.quick)
    _results.save_table("fp8_error", HEADERS, rows, meta, out=_results.RESULTS)
    print(tabulate(rows, headers=HEADERS))
    return rows


if __name__ == "__main__":
    main()
