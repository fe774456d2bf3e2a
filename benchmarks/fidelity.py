"""Fidelity of block-selection policies: attention error of each policy against the oracle, at equal density.

    python benchmarks/fidelity.py [--quick] [--images astronaut coffee ...] [--seeds 0 1]
        [--densities 0.5 0.2 0.1 0.05] [--dims 64 128] [--policies oracle topk ...]
        [--grids 4x24x32/8x16 ...] [--device cpu|cuda] [--json benchmarks/results/fidelity.json]

Runs on the CPU (about 3 minutes on 2 idle cores; --quick: seconds); on CUDA the same code, faster.
Inputs (_fidelity_inputs.py): panning clips of real photographs, patch-embedded, with spatial /
temporal / local / content heads made by how q and k are built. Per case (image, seed, grid, head
dim, head kind; 2 heads each):

- the truth, in float64: for every query token and key tile, the sums over the tile's keys of
  exp(logit - the row's max logit) and of that times v. Any kept set of tiles then gives the exact
  token-level attention restricted to it (a softmax over the kept tiles' keys) by one batched
  matmul over the tiles, O(L * S * D) instead of O(L^2 * D) per set; and the true mass of pair
  (i, j) = sum over the query tokens of tile i of their attention probability on tile j's keys.
- each policy keeps a set of (query tile, key tile) pairs, the diagonal always included;
  density = kept pairs / S^2. Error = ||O_sparse - O_dense|| / ||O_dense|| over the visual query
  rows of one head; ratio = error / the oracle's error at the same per-head count of pairs.
- the oracle keeps the diagonal plus the pairs of most true mass, so no set of as many pairs with
  the diagonal keeps more mass. It is not always the least error (mass is not error: on diffuse
  heads a spread-out set can average better), so a ratio below 1 is possible.

Policies: oracle, oracle_row (the oracle under topk's per-row count), percentile / topk / cdf (the
library's, on its draft map), local (static 3D window), random.

A policy is ``POLICIES[name] = (kind, fn)``; another module adds its own and calls ``evaluate``
(``from benchmarks.fidelity import POLICIES, evaluate``):

- ``"keep"``: ``fn(q, k, v, geom, density) -> bool [B, heads, S, S]`` (its own count; cdf's is adaptive)
- ``"score"``: ``fn(q, k, v, geom) -> [B, heads, S, S]``; the harness keeps the diagonal plus the
  best-scored pairs per head, round(density * S^2) pairs in all (at least S).
- ``"row_score"``: the same, but each query tile keeps its ceil(density * S) best (the library's
  topk count), diagonal included: S * ceil(density * S) pairs.

Prints tables (geometric-mean ratio to the oracle, mean absolute error in parentheses), writes the
report to --json (summary rows; one row per case x head x policy x density and the input statistics
as {"columns", "rows"} tables) and appends the summary rows to benchmarks/results/fidelity.jsonl
(_results.save_table).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass

import torch
from tabulate import tabulate

if __package__:  # imported as benchmarks.fidelity (tests, a module adding policies)
    from . import _results
    from ._fidelity_inputs import HEAD_KINDS, IMAGES, build_cases
else:  # python benchmarks/fidelity.py: the script's folder is on sys.path, as for every benchmark
    import _results
    from _fidelity_inputs import HEAD_KINDS, IMAGES, build_cases

from draftopt.kernels import draft_map, score_map, select_blocks, tile_pool
from draftopt.kernels.block_mask import indices_to_dense
from draftopt.kernels.geometry import permuted_source_index, tile_coords
from draftopt.kernels.sparsity import keep_count, with_diagonal

DENSITIES = (0.5, 0.2, 0.1, 0.05)
GRIDS = (((4, 24, 32), (8, 16)),  # whole tiles, S = 24
         ((3, 21, 37), (8, 16)),  # partial tiles at the bottom and right, S = 27
         ((4, 24, 32), (4, 16)))  # the first grid's tokens in finer tiles, S = 48
QUICK = dict(images=["astronaut", "camera"], seeds=[0], dims=[64], heads=2,
             grids=[((2, 12, 16), (4, 8)), ((2, 9, 17), (4, 8))])
KINDS = ("keep", "score", "row_score")
CDF_THRESHOLD = 0.9  # the library default


def last_call(fn):
    """Memo of ``fn``'s last call, keyed by the identity of its arguments: the harness and several
    policies ask for one case's truth or draft map many times; one entry keeps memory flat."""
    memo = {"args": None, "value": None}

    def wrapper(*args):
        old = memo["args"]
        if old is None or len(old) != len(args) or any(a is not b for a, b in zip(old, args)):
            memo["args"], memo["value"] = args, fn(*args)
        return memo["value"]

    return wrapper


# -- the truth -------------------------------------------------------------------------------------
@dataclass
class Truth:
    """Full attention of one case, by (query tile i, key tile j), float64. Query rows are in tile-major
    order (tile i's rows ``i * block ...``; rows past a partial tile's edge are padding, ``real`` False,
    with A = 1 and U = 0 so that their output is 0 whatever is kept).
    Sums are taken against each row's max logit over all keys, so any kept set of key tiles gives the
    restricted softmax by a sum over the kept j (one batched matmul)."""

    A: torch.Tensor  # [B, H, S, S, block]: sum over tile j's keys of exp(logit - row max)
    U: torch.Tensor  # [B, H, S, S, block * D]: sum of exp(logit - row max) v
    real: torch.Tensor  # [S, block] bool: the row is a real token
    mass: torch.Tensor  # [B, H, S, S] true attention mass of each (query tile, key tile)
    dense: torch.Tensor  # [B, H, S, block, D] full attention output (padding rows: 0)
    dense_norm: torch.Tensor  # [B, H]


@last_call
def attention_truth(q, k, v, geom) -> Truth:
    """Tile-level sums of full attention, float64 (q, k, v gathered tile-major, padding masked)."""
    if geom.text_len:
        raise ValueError("fidelity measures visual tiles only: use a geometry with text_len=0")
    B, H, _, D = q.shape
    S, blk = geom.n_tiles, geom.block
    src = permuted_source_index(geom, q.device)[: S * blk]
    q64, k64, v64 = (t.to(torch.float64)[:, :, src.clamp(min=0)] for t in (q, k, v))
    logits = (q64 @ k64.transpose(-1, -2) * D ** -0.5).masked_fill_(src < 0, -math.inf)
    e = logits.sub_(logits.amax(-1, keepdim=True)).exp_().view(B, H, S, blk, S, blk)
    A = e.sum(-1).permute(0, 1, 2, 4, 3).contiguous()  # [B, H, S_q, S_k, blk_q]
    U = torch.einsum("bhiqjk,bhjkd->bhijqd", e, v64.view(B, H, S, blk, D))
    U = U.reshape(B, H, S, S, blk * D).contiguous()  # contiguous: sparse_output's matmul streams it
    real = (src >= 0).view(S, blk)
    diag = A.diagonal(dim1=2, dim2=3).permute(0, 1, 3, 2)  # [B, H, S, blk]: each row's own tile
    if not bool((diag[..., real] > 1e-290).all()):  # exp underflow: the diagonal could not anchor a row
        raise ValueError("a query row's own tile is > 660 logits below its max: scale the inputs down")
    p_tile = A / A.sum(3, keepdim=True)  # each query row's probability on each key tile
    mass = (p_tile * real[:, None]).sum(-1)
    pad = ~real[:, None, :].expand(S, S, blk)  # padding query rows: output 0 / 1, whatever is kept,
    A.masked_fill_(pad, 1.0)  # so they add nothing to an error and need no indexing out
    U.view(B, H, S, S, blk, D).masked_fill_(pad[..., None], 0.0)
    truth = Truth(A, U, real, mass, None, None)
    truth.dense = sparse_output(truth, torch.ones(B, H, S, S, dtype=torch.bool, device=q.device))
    truth.dense_norm = truth.dense.flatten(2).norm(dim=-1)
    return truth


def sparse_output(truth: Truth, keep: torch.Tensor) -> torch.Tensor:
    """Exact attention over the keys of the kept tiles only: [B, H, S, block, D] float64."""
    B, H, S, _ = keep.shape
    w = keep.to(torch.float64).unsqueeze(-2)  # [B, H, S, 1, S]: query tile i's kept key tiles
    num = (w @ truth.U).view(B, H, S, truth.real.shape[1], -1)
    return num / (w @ truth.A).view(B, H, S, -1, 1)


def relative_error(truth: Truth, keep: torch.Tensor) -> torch.Tensor:
    """[B, H]: ||O_sparse - O_dense|| / ||O_dense|| over the visual query rows (padding rows are 0 in both)."""
    return (sparse_output(truth, keep) - truth.dense).flatten(2).norm(dim=-1) / truth.dense_norm


def kept_mass(truth: Truth, keep: torch.Tensor) -> torch.Tensor:
    """[B, H]: fraction of the true attention mass on the kept pairs (mean over query tokens)."""
    return (truth.mass * keep).sum((-2, -1)) / int(truth.real.sum())


# -- selection -------------------------------------------------------------------------------------
def pair_count(kind: str, density: float, S: int) -> int:
    """Pairs a "score" (global) or "row_score" (per query tile) policy keeps at ``density``."""
    if kind == "row_score":
        return S * keep_count(1.0 - density, S)  # the library's topk count per row
    return min(S * S, max(S, math.floor(round(density * S * S, 6) + 0.5)))


def keep_top(score: torch.Tensor, n) -> torch.Tensor:
    """Bool [B, H, S, S]: per head the diagonal and then the best-scored pairs, ``n`` in all
    (an int, or a [B, H] tensor of counts); ties go to the lower flat index (stable sort)."""
    B, H, S, _ = score.shape
    diag = torch.eye(S, dtype=torch.bool, device=score.device)
    flat = score.to(torch.float64).masked_fill(diag, math.inf).reshape(B, H, S * S)
    order = flat.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(S * S, device=score.device).expand_as(order))
    n = torch.as_tensor(n, device=score.device)
    return (rank < (n[..., None] if n.dim() else n)).reshape(B, H, S, S)


def keep_rows(score: torch.Tensor, per_row: int) -> torch.Tensor:
    """Bool [B, H, S, S]: each query tile's diagonal and its best-scored key tiles, ``per_row`` in all."""
    S = score.shape[-1]
    diag = torch.eye(S, dtype=torch.bool, device=score.device)
    top = score.to(torch.float64).masked_fill(diag, math.inf).topk(per_row, dim=-1).indices
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, top, True)


def select(name: str, q, k, v, geom, density: float, scores: dict) -> torch.Tensor:
    """The kept pairs of policy ``name``; ``scores`` caches a score policy's map across densities."""
    kind, fn = POLICIES[name]
    if kind == "keep":
        return with_diagonal(fn(q, k, v, geom, density).to(torch.bool))
    if name not in scores:
        scores[name] = fn(q, k, v, geom)
    n = pair_count(kind, density, geom.n_tiles)
    return keep_top(scores[name], n) if kind == "score" else keep_rows(scores[name], n // geom.n_tiles)


# -- policies --------------------------------------------------------------------------------------
POLICIES: dict[str, tuple[str, callable]] = {}


def register(name: str, kind: str):
    """Decorator: ``@register("mine", "score")`` adds ``fn`` to POLICIES (kinds: see the module doc)."""
    if kind not in KINDS:
        raise ValueError(f"policy kind must be one of {KINDS}, got {kind!r}")

    def add(fn):
        POLICIES[name] = (kind, fn)
        return fn

    return add


@register("oracle", "score")
def oracle_scores(q, k, v, geom):
    return attention_truth(q, k, v, geom).mass


@register("oracle_row", "row_score")  # the oracle under topk's constraint: what a fixed row count costs
def oracle_row_scores(q, k, v, geom):
    return attention_truth(q, k, v, geom).mass


@last_call
def draft(q, k, geom):
    """The library's draft map (tile_pool + draft_map, scale D^-0.5), as draft_attention computes it."""
    return draft_map(tile_pool(q, geom), tile_pool(k, geom), q.shape[-1] ** -0.5)


@register("percentile", "score")  # the paper's rule, at an exact count (keep_percentile adds the diagonal on top)
def percentile_scores(q, k, v, geom):
    return draft(q, k, geom)


@register("mass", "score")  # the library's default: each head's pairs of largest estimated attention mass
def mass_scores(q, k, v, geom):
    return score_map(q, k, geom, q.shape[-1] ** -0.5, "mass")


@register("topk", "row_score")  # the same pairs as select_blocks(P, 1 - density, "topk")
def topk_scores(q, k, v, geom):
    return draft(q, k, geom)


@register("cdf", "keep")  # adaptive: fewer pairs than topk's budget when the draft mass is concentrated
def cdf_keep(q, k, v, geom, density):
    kv_idx, kv_cnt = select_blocks(draft(q, k, geom), 1.0 - density, "cdf", CDF_THRESHOLD)
    return indices_to_dense(kv_idx, kv_cnt)


@register("local", "row_score")
def local_scores(q, k, v, geom):
    """Static window: nearest key tiles in (frame, tile row, tile column) distance; ties go to the
    smaller index distance (same row of tiles first, then same frame, then other frames)."""
    S = geom.n_tiles
    idx = torch.arange(S, device=q.device)
    c = torch.stack(tile_coords(idx, geom), dim=-1).to(torch.float64)
    d2 = ((c[:, None] - c[None]) ** 2).sum(-1) + (idx[:, None] - idx[None]).abs() / (S * S)
    return (-d2).expand(*q.shape[:2], S, S)


@register("random", "score")
def random_scores(q, k, v, geom):
    """Uniform random pairs; seeded from the input so a run is reproducible."""
    gen = torch.Generator().manual_seed(zlib.crc32(q[..., :8].float().cpu().numpy().tobytes()))
    return torch.rand(*q.shape[:2], geom.n_tiles, geom.n_tiles, generator=gen, dtype=torch.float64).to(q.device)


# -- the harness -----------------------------------------------------------------------------------
def evaluate_case(case, policies, densities) -> list[dict]:
    """One row per (batch, head, density, policy): counts, kept mass, errors, ratio to the oracle."""
    q, k, v, geom = case.q, case.k, case.v, case.geom
    truth, scores, oracle_at = attention_truth(q, k, v, geom), {}, {}
    S, rows = geom.n_tiles, []
    for density in densities:
        for name in policies:
            keep = select(name, q, k, v, geom, density, scores)
            count = keep.sum((-2, -1))
            key = tuple(count.flatten().tolist())
            if key not in oracle_at:  # the oracle at this policy's per-head count
                ok = keep_top(truth.mass, count)
                oracle_at[key] = (relative_error(truth, ok), kept_mass(truth, ok))
            err, mass = relative_error(truth, keep), kept_mass(truth, keep)
            o_err, o_mass = oracle_at[key]
            for b, h in ((b, h) for b in range(count.shape[0]) for h in range(count.shape[1])):
                rows.append(dict(case.meta, head=h + b * count.shape[1], S=S, policy=name, density=density,
                                 count=int(count[b, h]), realized_density=int(count[b, h]) / (S * S),
                                 mass=float(mass[b, h]), oracle_mass=float(o_mass[b, h]),
                                 error=float(err[b, h]), oracle_error=float(o_err[b, h]),
                                 ratio=ratio(float(err[b, h]), float(o_err[b, h]))))
    return rows


def ratio(err: float, oracle_err: float) -> float:
    """err / oracle_err; 1 where both are at rounding level (density 1: both exact)."""
    tiny = 1e-12
    if oracle_err > tiny:
        return err / oracle_err
    return 1.0 if err <= tiny else math.inf


def input_stats(case) -> list[dict]:
    """What each head attends to, at tile level (checks the inputs look as their kind says)."""
    truth, geom = attention_truth(case.q, case.k, case.v, case.geom), case.geom
    t, hi, wi = tile_coords(torch.arange(geom.n_tiles, device=case.q.device), geom)
    same_t, same_hw = t[:, None] == t[None], (hi[:, None] == hi[None]) & (wi[:, None] == wi[None])
    frac = truth.mass / int(truth.real.sum())
    stats = dict(same_frame=frac * same_t, same_position_other_frames=frac * (same_hw & ~same_t),
                 diagonal=frac * torch.eye(geom.n_tiles, dtype=torch.bool, device=frac.device))
    B, H = frac.shape[:2]
    return [dict(case.meta, head=h + b * H, **{k: float(v[b, h].sum()) for k, v in stats.items()})
            for b in range(B) for h in range(H)]


def evaluate(cases, policies=None, densities=DENSITIES, progress=None) -> tuple[list[dict], list[dict]]:
    """(rows, input stats) over ``cases`` (Case objects of _fidelity_inputs, or any with q, k, v,
    geom, meta); ``policies`` are names in POLICIES (default: all); ``progress`` wraps the iterable."""
    policies = list(POLICIES) if policies is None else list(policies)
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; registered: {sorted(POLICIES)}")
    rows, stats = [], []
    for case in (progress(cases) if progress else cases):
        rows += evaluate_case(case, policies, densities)
        stats += input_stats(case)
    return rows, stats


# -- aggregation and tables ------------------------------------------------------------------------
MEASURES = ("ratio", "error", "oracle_error", "realized_density", "mass", "oracle_mass")


def gmean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(x) if x > 0 else -math.inf for x in values) / len(values))


def mean_by(rows, keys) -> dict:
    """{key tuple: {measure: arithmetic mean, "ratio_gmean": geometric mean of the ratios, "n": rows}}
    over inputs (cases and heads). Ratios are summarized by their geometric mean: a head whose
    oracle error is tiny gives a ratio of 50 at d=0.5, which would swamp an arithmetic mean."""
    groups = defaultdict(list)
    for r in rows:
        groups[tuple(r[k] for k in keys)].append(r)
    return {key: dict(n=len(g), ratio_gmean=gmean(r["ratio"] for r in g),
                      **{m: sum(r[m] for r in g) / len(g) for m in MEASURES})
            for key, g in groups.items()}


def summary_rows(rows) -> tuple[list, list]:
    """(headers, rows) for save_table: per (policy, density) over all kinds, then per head kind."""
    cols = ("ratio_gmean", *MEASURES, "n")
    out = [[p, "all", d, *(s[c] for c in cols)] for (p, d), s in mean_by(rows, ("policy", "density")).items()]
    out += [[p, kd, d, *(s[c] for c in cols)] for (p, kd, d), s in mean_by(rows, ("policy", "kind", "density")).items()]
    headers = ["policy", "kind", "density", *cols]
    return headers, out


def cell(s: dict) -> str:
    return f"{s['ratio_gmean']:.2f} ({s['error']:.3f})"


def tables(rows, stats, policies, densities) -> str:
    """The printed report: ratio table, mass / density table, per-head-kind table, input table."""
    by_pd = mean_by(rows, ("policy", "density"))
    head = ["policy"] + [f"d={d:g}" for d in densities]
    out = ["Error / the oracle's error at equal density, geometric mean (mean relative L2 error):",
           tabulate([[p] + [cell(by_pd[p, d]) for d in densities] for p in policies], head),
           "\nKept true attention mass (realized density):",
           tabulate([[p] + [f"{by_pd[p, d]['mass']:.3f} ({by_pd[p, d]['realized_density']:.3f})"
                            for d in densities] for p in policies], head)]
    d0 = 0.1 if 0.1 in densities else densities[len(densities) // 2]
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    by_k = mean_by(rows, ("policy", "kind", "density"))
    out += [f"\nPer head kind at density {d0:g}: error / oracle's, geometric mean (mean error):",
            tabulate([[p] + [cell(by_k[p, kd, d0]) for kd in kinds] for p in policies], ["policy"] + kinds)]
    groups = defaultdict(list)
    for s in stats:
        groups[s["kind"]].append(s)
    cols = ("same_frame", "same_position_other_frames", "diagonal")
    out += ["\nInputs: mean attention mass per head kind (tile level):",
            tabulate([[kd] + [f"{sum(s[c] for s in g) / len(g):.3f}" for c in cols] for kd, g in groups.items()],
                     ["kind", *cols])]
    return "\n".join(out)


# -- command line ----------------------------------------------------------------------------------
def parse_grid(text: str):
    """"4x24x32/8x16" -> ((4, 24, 32), (8, 16))."""
    grid, tile = text.split("/")
    return tuple(map(int, grid.split("x"))), tuple(map(int, tile.split("x")))


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", nargs="+", default=list(IMAGES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--densities", nargs="+", type=float, default=list(DENSITIES))
    ap.add_argument("--dims", nargs="+", type=int, default=[64, 128])
    ap.add_argument("--grids", nargs="+", type=parse_grid, default=list(GRIDS), help="TxHxW/thxtw")
    ap.add_argument("--kinds", nargs="+", default=list(HEAD_KINDS), choices=list(HEAD_KINDS))
    ap.add_argument("--heads", type=int, default=2, help="heads per case")
    ap.add_argument("--policies", nargs="+", default=None, help=f"default: all of {list(POLICIES)}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny config (tests): " + str(QUICK))
    ap.add_argument("--json", default=os.path.join(_results.RESULTS, "fidelity.json"))
    ap.add_argument("--out", default=None, help="save_table's JSON/CSV folder (default: that of --json)")
    args = ap.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    unknown = [p for p in args.policies or () if p not in POLICIES]
    if unknown:
        ap.error(f"unknown policies {unknown}; registered: {list(POLICIES)}")
    if not all(0.0 < d <= 1.0 for d in args.densities):
        ap.error(f"densities must be in (0, 1], got {args.densities}")
    return args


def columns(records: list[dict]) -> dict:
    """{"columns": [...], "rows": [[...]]}, floats to 7 significant digits: the per-head rows in a
    few MB less than as dicts (``pandas.DataFrame(d["rows"], columns=d["columns"])`` reads them)."""
    cols = list(records[0]) if records else []
    fmt = lambda x: float(f"{x:.7g}") if isinstance(x, float) else x  # noqa: E731
    return dict(columns=cols, rows=[[fmt(r[c]) for c in cols] for r in records])


def main(argv=None) -> dict:
    """Run the benchmark; returns the report that it also writes to --json."""
    import json

    from tqdm import tqdm

    args = parse_args(argv)
    policies = args.policies or list(POLICIES)
    n_cases = len(args.images) * len(args.seeds) * len(args.grids) * len(args.dims) * len(args.kinds)
    cases = build_cases(args.images, args.seeds, args.grids, args.dims, args.kinds, args.heads, args.device)
    start = time.perf_counter()
    with torch.no_grad():
        rows, stats = evaluate(cases, policies, args.densities,
                               progress=lambda c: tqdm(c, total=n_cases, desc="fidelity", disable=args.quick))
    seconds = time.perf_counter() - start
    print(tables(rows, stats, policies, args.densities))
    headers, summary = summary_rows(rows)
    meta = dict(device=args.device if args.device != "cpu" else f"cpu ({torch.get_num_threads()} threads)",
                images=args.images, seeds=args.seeds, dims=args.dims, heads=args.heads, kinds=args.kinds,
                grids=[f"{'x'.join(map(str, g))}/{'x'.join(map(str, t))}" for g, t in args.grids],
                densities=args.densities, policies=policies, quick=args.quick, seconds=round(seconds, 1))
    out = args.out or os.path.dirname(os.path.abspath(args.json))
    _results.save_table("fidelity", headers, summary, meta, out=out)
    report = dict(_results.run_info(meta), rows=[dict(zip(headers, r)) for r in summary], cases=rows, inputs=stats)
    with open(args.json, "w") as f:  # after save_table: where both write one path, the full report wins
        json.dump(dict(report, cases=columns(rows), inputs=columns(stats)), f, default=str)
    print(f"\n{len(rows)} rows in {seconds:.0f} s; report: {args.json}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
