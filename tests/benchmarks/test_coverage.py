"""benchmarks/coverage.py: its per-model measurement on two quick models (diffusers Wan, HunyuanVideo), on the CPU.

    python -m pytest -q tests/benchmarks/test_coverage.py

The rows are real measurements (aot_eager, the script's own builds and inputs); the checks are what must hold
whatever the numbers: the sites the report lists, their grids and text tokens, the sparsity-0 error, and that a
failing model is a row, not a crash.
"""

import json

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("tqdm")

from benchmarks import coverage as cov  # noqa: E402

QUICK = ("Wan", "HunyuanVideo")


@pytest.fixture(scope="module")
def rows():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cov, "BASELINE_ABOVE", -1.0)  # Wan: the compiler-only error too (draftopt.dense graphs)
        wan = cov.measure("Wan", compiler="aot_eager", fallback=None)
    return {"Wan": wan, "HunyuanVideo": cov.measure("HunyuanVideo", compiler="aot_eager", fallback=None)}


def test_every_field_is_filled(rows):
    for name, r in rows.items():
        assert r["error"] is None, r["traceback"]
        assert set(cov.HEADERS) <= set(r), set(cov.HEADERS) - set(r)
        assert r["model"] == name and r["compiler"] == "aot_eager" and r["latent_shape"] is None
        assert r["sites"] == r["rewritten"] + r["skipped"] == len(r["sites_detail"])
        assert r["unseen_attention"] == 0 and r["graphs"] == 1 and not r["graph_breaks"]
        assert 0.0 < r["rel_err"] < 1e-5  # sparsity 0: the rewrite reproduces the model to fp32 rounding
        assert r["seconds"] > 0 and r["compile_seconds"] > 0


def test_wan_row(rows):
    r = rows["Wan"]
    assert r["cls"] == "WanTransformer3DModel"
    assert (r["sites"], r["rewritten"], r["skipped"], r["dense"]) == (2, 1, 1, 0)
    assert r["grid_text"] == ["2x8x16, text 0"]
    assert r["skipped_reasons"] == ["cross-attention: 256 queries attend to 8 keys (not a candidate)"]
    assert r["dense_reasons"] == []
    assert r["eager_attention"] == ["1 x sdpa 256x256", "1 x sdpa 256x8"]
    # the dense graphs of the compiler-only measure are not counted as sites
    assert 0.0 <= r["rel_err_compiler_only"] < 1e-5 and r["graphs"] == 1
    assert [(s["name"], s["status"]) for s in r["sites_detail"]] == [("blocks.0.attn1", "rewritten"),
                                                                     ("blocks.0.attn2", "skipped")]


def test_hunyuan_row(rows):
    r = rows["HunyuanVideo"]
    assert r["cls"] == "HunyuanVideoTransformer3DModel"
    assert (r["sites"], r["rewritten"], r["skipped"], r["dense"]) == (3, 2, 1, 0)
    # dual- and single-stream joint attention: 256 video tokens, 8 text tokens after them, padded prompt
    assert r["grid_text"] == ["2x8x16, text 8@end, key padding"]
    (refiner,) = r["skipped_reasons"]
    assert refiner.startswith("sequence length 8 is shorter than every grid") and refiner.endswith("(not a candidate)")


def test_error_is_a_row(monkeypatch):
    def broken():
        raise RuntimeError("no such config")

    monkeypatch.setitem(cov.MODELS, "Broken", broken)
    r = cov.measure("Broken", compiler="aot_eager")
    assert r["error"] == "RuntimeError: no such config" and "broken" in r["traceback"]
    assert r["sites"] is None and r["rel_err"] is None
    assert "**error**: RuntimeError: no such config" in cov.markdown([r])


def test_main_prints_the_table_and_appends_the_rows(rows, monkeypatch, tmp_path, capsys):
    """main() on the measured rows (measure replaced by a lookup: no second compile): the markdown table, and one
    JSON line per row with the run's meta, in --out and in the history folder (here tmp)."""
    monkeypatch.setattr(cov._results, "RESULTS", str(tmp_path / "results"))
    monkeypatch.setattr(cov, "measure", lambda name, *a, **k: rows[name])
    cov.main(["--models", "wan", "hunyuanvideo", "--compiler", "aot_eager", "--out", str(tmp_path / "out")])
    table = capsys.readouterr().out
    assert "| model (class) | sites seen | rewritten | skipped (reason) | grid, text | sparsity-0 rel. error |" in table
    assert "| Wan (WanTransformer3DModel) | 2 | 1 |" in table
    assert "2x8x16, text 8@end, key padding" in table
    for folder in ("results", "out"):
        lines = [json.loads(x) for x in (tmp_path / folder / "coverage.jsonl").read_text().splitlines()]
        assert [x["model"] for x in lines] == list(QUICK)
        assert lines[0]["rewritten"] == 1 and lines[1]["grid_text"] == rows["HunyuanVideo"]["grid_text"]
        assert {"date", "command", "torch", "device", "diffusers"} <= set(lines[0])


def test_select():
    assert cov.select(["wan"]) == ["Wan"]
    assert cov.select(["Wan*"])[:2] == ["Wan", "WanVACE"]
    assert cov.select(None) == list(cov.MODELS)
    with pytest.raises(SystemExit, match="no model 'Nope'"):
        cov.select(["Nope"])
