"""The fidelity harness (benchmarks/fidelity.py) on its --quick config, in process, on the CPU.

    python -m pytest -q tests/benchmarks/test_fidelity.py

Checks what must hold whatever the numbers: the oracle keeps the most true mass at every count,
counts are exact, density 1 is exact attention, the restricted attention equals a token-level
masked softmax, "topk" is the library's topk, and the inputs' heads attend as their kind says.
"""

import json
import math
from collections import defaultdict

import pytest
import torch

pytest.importorskip("skimage")

from benchmarks import _fidelity_inputs as fin  # noqa: E402
from benchmarks import fidelity as fid  # noqa: E402
from draftopt.kernels import select_blocks  # noqa: E402
from draftopt.kernels.block_mask import indices_to_dense  # noqa: E402
from draftopt.kernels.geometry import permuted_source_index  # noqa: E402
from draftopt.kernels.sparsity import with_diagonal  # noqa: E402

DENSITIES = (1.0, 0.5, 0.2, 0.1, 0.05)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(report, tmp dir) of one --quick run; its history lines go to tmp, not benchmarks/results."""
    tmp = tmp_path_factory.mktemp("fidelity")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fid._results, "RESULTS", str(tmp))
        report = fid.main(["--quick", "--densities", *map(str, DENSITIES), "--json", str(tmp / "f.json")])
    return report, tmp


@pytest.fixture(scope="module")
def rows(run):
    return run[0]["cases"]


@pytest.fixture(scope="module")
def small_case():
    grid, tile = fid.QUICK["grids"][1]  # partial tiles: padding rows and keys must not count
    return next(fin.build_cases(["coffee"], [0], [(grid, tile)], [64], ["local"], heads=2))


def head_key(r):
    return r["image"], r["seed"], r["grid"], r["D"], r["kind"], r["head"]


def test_report_written(run, rows):
    report, tmp = run
    assert json.loads((tmp / "f.json").read_text())["rows"] == json.loads(json.dumps(report["rows"]))
    history = (tmp / "fidelity.jsonl").read_text().splitlines()
    assert len(history) == len(report["rows"]) and json.loads(history[0])["quick"] is True
    n_heads = len(fid.QUICK["images"]) * len(fid.QUICK["grids"]) * len(fin.HEAD_KINDS) * fid.QUICK["heads"]
    assert len(rows) == n_heads * len(DENSITIES) * len(fid.POLICIES)


def test_oracle_keeps_the_most_mass(rows):
    # Exact up to float64 summation of different sets (1e-12 of a mass fraction <= 1).
    for r in rows:
        assert r["mass"] <= r["oracle_mass"] + 1e-12, r
        if r["policy"] == "oracle":
            assert r["mass"] == r["oracle_mass"] and r["error"] == r["oracle_error"] and r["ratio"] == 1.0


def test_counts_are_exact(rows):
    for r in rows:
        kind, S = fid.POLICIES[r["policy"]][0], r["S"]
        assert r["realized_density"] == r["count"] / S ** 2
        if kind == "keep":  # cdf: adaptive, never below the diagonal; at most its per-row budget plus
            # the diagonal (keep_cdf caps the best tiles, then adds the diagonal when it was not among them)
            assert S <= r["count"] <= fid.pair_count("row_score", r["density"], S) + S, r
        else:
            assert r["count"] == fid.pair_count(kind, r["density"], S), r
    assert fid.pair_count("score", 0.1, 27) == 73 and fid.pair_count("row_score", 0.1, 27) == 27 * 3


def test_density_one_is_exact(rows):
    for r in (r for r in rows if r["density"] == 1.0):
        assert r["count"] == r["S"] ** 2 and r["error"] < 1e-12 and abs(r["mass"] - 1) < 1e-12, r


def test_oracle_improves_with_density(rows):
    # Kept mass: nested sets, so exactly monotone per head. Error: not guaranteed per head (adding a
    # tile can move a row's output away by chance), so per head only across the widest gap, and the
    # mean over heads strictly.
    per_head = defaultdict(dict)
    for r in (r for r in rows if r["policy"] == "oracle"):
        per_head[head_key(r)][r["density"]] = r
    for by_d in per_head.values():
        ds = sorted(by_d)
        assert all(by_d[a]["mass"] <= by_d[b]["mass"] for a, b in zip(ds, ds[1:]))
        assert by_d[max(ds)]["error"] < by_d[min(ds)]["error"]
    means = [sum(h[d]["error"] for h in per_head.values()) / len(per_head) for d in sorted(DENSITIES)]
    assert all(a > b for a, b in zip(means, means[1:])), means


def test_sparse_output_is_masked_attention(small_case):
    """The tile-sum shortcut equals a token-level masked softmax over the kept tiles' keys."""
    q, k, v, geom = small_case.q, small_case.k, small_case.v, small_case.geom
    truth = fid.attention_truth(q, k, v, geom)
    S = geom.n_tiles
    keep = with_diagonal(torch.rand(1, q.shape[1], S, S) < 0.3)
    src = permuted_source_index(geom)[: S * geom.block]
    rows = src[src >= 0]  # tile-major order of the real tokens
    tile_of = torch.empty(geom.n_visual, dtype=torch.long)
    tile_of[rows] = torch.arange(S * geom.block)[src >= 0] // geom.block
    mask = keep[:, :, tile_of][:, :, :, tile_of]  # [1, H, N, N]
    q64, k64, v64 = (t.double() for t in (q, k, v))
    logits = (q64 @ k64.transpose(-1, -2) * q.shape[-1] ** -0.5)
    ref = torch.softmax(logits.masked_fill(~mask, -math.inf), -1) @ v64
    got = fid.sparse_output(truth, keep)[:, :, truth.real]
    torch.testing.assert_close(got, ref[:, :, rows], rtol=1e-10, atol=1e-12)
    p = torch.softmax(logits, -1)
    mass = torch.zeros(1, q.shape[1], S, S, dtype=torch.float64)
    mass.index_put_((torch.arange(1)[:, None, None, None], torch.arange(q.shape[1])[None, :, None, None],
                     tile_of[None, None, :, None], tile_of[None, None, None, :]), p, accumulate=True)
    torch.testing.assert_close(truth.mass, mass, rtol=1e-10, atol=1e-12)


def test_topk_is_the_library_topk(small_case):
    q, k, v, geom = small_case.q, small_case.k, small_case.v, small_case.geom
    P = fid.draft(q, k, geom)
    for d in (0.5, 0.2, 0.05):
        harness = fid.select("topk", q, k, v, geom, d, {})
        assert torch.equal(harness, indices_to_dense(*select_blocks(P, 1.0 - d, "topk")))


def test_a_registered_policy_runs(small_case, monkeypatch):
    monkeypatch.setitem(fid.POLICIES, "diagonal", ("keep", lambda q, k, v, geom, d: torch.zeros(
        *q.shape[:2], geom.n_tiles, geom.n_tiles, dtype=torch.bool)))
    rows, _ = fid.evaluate([small_case], ["diagonal", "oracle"], [0.2])
    diag = [r for r in rows if r["policy"] == "diagonal"]
    assert all(r["count"] == r["S"] and r["mass"] <= r["oracle_mass"] for r in diag)
    with pytest.raises(ValueError, match="unknown policies"):
        fid.evaluate([small_case], ["no-such-policy"])


def test_inputs_attend_as_their_kind(run):
    by_kind = defaultdict(list)
    for s in run[0]["inputs"]:
        by_kind[s["kind"]].append(s)
    mean = {kd: {c: sum(s[c] for s in g) / len(g) for c in ("same_frame", "same_position_other_frames")}
            for kd, g in by_kind.items()}
    assert mean["spatial"]["same_frame"] > 0.9
    assert max(mean, key=lambda kd: mean[kd]["same_position_other_frames"]) == "temporal"
    assert all(mean[kd]["same_frame"] < mean["spatial"]["same_frame"] for kd in mean if kd != "spatial")
