"""benchmarks/pipeline.py in its --tiny mode (tiny WanPipeline, 3 steps, CPU), in process.

    python -m pytest -q tests/benchmarks/test_pipeline.py

Checks the table's rows and the history lines, not the numbers: a CPU's timings of a tiny model say
nothing about a GPU's. About 20 s, most of it importing diffusers and transformers.
"""

import json

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from benchmarks import _results  # noqa: E402
from benchmarks import pipeline  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(rows, tmp dir) of one --tiny run; its history lines go to tmp, not benchmarks/results."""
    tmp = tmp_path_factory.mktemp("pipeline")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_results, "RESULTS", str(tmp / "history"))
        rows = pipeline.main(["--tiny", "--out", str(tmp)])
    return rows, tmp


def test_rows(run):
    rows, _ = run
    assert [r[0] for r in rows] == ["dense (eager, SDPA flash_attention)", "draftopt 0.9, 1 dense step"]
    dense, draft = (dict(zip(pipeline.HEADERS, r)) for r in rows)
    step = "per-step ms (dense steps / sparse steps)"
    dense_ms, none = dense[step].split(" / ")
    warm_ms, sparse_ms = map(float, draft[step].split(" / "))
    assert none == "-" and min(float(dense_ms), warm_ms, sparse_ms) > 0
    # loop s extrapolates 3 steps: dense 3 x its step; draftopt 1 dense + 2 sparse steps
    assert float(dense["loop s"]) == pytest.approx(3 * float(dense_ms) / 1e3, abs=0.006)
    assert float(draft["loop s"]) == pytest.approx((warm_ms + 2 * sparse_ms) / 1e3, abs=0.006)
    assert float(draft["video s"]) - float(draft["loop s"]) == pytest.approx(
        float(dense["video s"]) - float(dense["loop s"]), abs=0.011)  # one decode, both rows
    assert dense["x dense (video)"] == dense["x dense (loop)"] == "1.00x"
    assert all(r["timing"] == "extrapolated from 1 step to 3" for r in (dense, draft))


def test_history_and_files(run):
    rows, tmp = run
    lines = [json.loads(x) for x in (tmp / "history" / "pipeline.jsonl").read_text().splitlines()]
    assert [x["config"] for x in lines] == [r[0] for r in rows]
    for x in lines:
        assert x["device"] == "CPU tiny" and x["timed_steps"] == 1 and x["steps"] == 3 and x["dense_steps"] == 1
        assert x["rewritten"] == 1 and x["sites"] == 2 and x["kernels"] == ["torch"]  # one block graph's attn1
        assert x["decode_s"] > 0 and x["latent"] == [2, 16, 32] and "command" in x and "date" in x
    assert len(json.loads((tmp / "pipeline.json").read_text())["rows"]) == 2
    assert (tmp / "pipeline.jsonl").read_text() == (tmp / "history" / "pipeline.jsonl").read_text()
