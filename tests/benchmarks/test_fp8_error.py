"""benchmarks/fp8_error.py on its --quick config, in process, on the CPU: what must hold whatever the numbers."""

import pytest

pytest.importorskip("skimage")

from benchmarks import fp8_error  # noqa: E402


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # its history lines go to tmp, not benchmarks/results
        mp.setattr(fp8_error._results, "RESULTS", str(tmp_path_factory.mktemp("fp8_error")))
        return {(r[0], r[1]): dict(zip(fp8_error.HEADERS, r)) for r in fp8_error.main(["--quick"])}


def test_every_head_kind_and_sparsity_has_a_row(rows):
    kinds = {"all", "spatial", "temporal", "local", "content"}
    assert set(rows) == {(k, s) for k in kinds for s in fp8_error.QUICK["sparsities"]}
    assert rows["all", 0.0]["cases"] == sum(rows[k, 0.0]["cases"] for k in kinds - {"all"})


def test_fp8_is_really_quantized_and_within_its_budget(rows):
    """At sparsity 0 only the precision differs: bf16 is near exact, FP8 visibly not, and both are small."""
    for (kind, s), r in rows.items():
        if s == 0.0:
            assert r["bf16 error"] < 5e-3 < r["fp8 error"] < 5e-2, kind
            assert r["fp8 / bf16 (max)"] >= r["fp8 / bf16 (geo mean)"] > 1


def test_sparsity_adds_error(rows):
    assert rows["all", 0.5]["bf16 error"] > rows["all", 0.0]["bf16 error"]
    assert rows["all", 0.5]["fp8 error"] > rows["all", 0.0]["fp8 error"]
