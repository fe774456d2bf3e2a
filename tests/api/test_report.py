"""Reports: tables, FLOPs, JSON, markdown, HTML, code diff, trace artifact, mask pictures, CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import draftopt
from draftopt.__main__ import main as cli_main
from draftopt.passes import SiteRecord
from draftopt.report import GraphRecord, Report, site_flops

from ..helpers import CPU_OPTIONS as OPTS
from ..models import hunyuan_inputs, tiny_hunyuan, tiny_wan, wan_inputs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def wan_report():
    torch._dynamo.reset()
    model = draftopt.optimize(tiny_wan(), sparsity=0.75, **OPTS)
    with torch.no_grad():
        model(**wan_inputs())
    return draftopt.report(model)


@pytest.fixture(scope="module")
def hunyuan_report():
    torch._dynamo.reset()
    model = draftopt.optimize(tiny_hunyuan(), sparsity=0.75, policy="topk", **OPTS)
    with torch.no_grad():
        model(**hunyuan_inputs())
    return draftopt.report(model)


def test_sites_and_reasons(wan_report, hunyuan_report):
    assert [(s.name, s.status) for s in wan_report.sites] == [
        ("blocks.0.attn1", "rewritten"), ("blocks.0.attn2", "skipped"),
        ("blocks.1.attn1", "rewritten"), ("blocks.1.attn2", "skipped")]
    assert all("cross-attention: 256 queries attend to 8 keys" == s.reason for s in wan_report.skipped)
    names = [s.name for s in hunyuan_report.rewritten]
    assert names == ["transformer_blocks.0.attn", "transformer_blocks.1.attn",
                     "single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"]
    (refiner,) = hunyuan_report.skipped
    assert "sequence length 8 is shorter than every grid" in refiner.reason  # text-only: not a candidate
    assert not refiner.candidate
    text = str(hunyuan_report)
    for s in hunyuan_report.sites:
        assert s.name in text
    assert "5 attention site(s): 4 rewritten, 1 skipped" in text


def test_flops_estimate_matches_a_hand_computation(wan_report):
    site = wan_report.rewritten[0]
    # q [1, 2, 256, 16]; 2x8x16 grid in 4x4 tiles: S = 16 tiles of 16 tokens, no text.
    # percentile at 0.75 keeps ceil(0.25 * 16 * 16) = 64 tile pairs.
    dense = 4 * 1 * 2 * 256 * 256 * 16
    attend = 4 * 1 * 2 * 16 * (16 * 16) * 64
    draft_map = 2 * (2 * 1 * 2 * 16 * 16 * 16)
    assert site_flops(site) == (dense, attend + draft_map)
    totals = wan_report.totals()
    cross = 4 * 1 * 2 * 256 * 8 * 16  # the two skipped cross-attentions count dense
    assert totals["attention_flops_dense"] == 2 * dense + 2 * cross
    assert totals["attention_flops_sparse"] == 2 * (attend + draft_map) + 2 * cross
    assert 0 < totals["attention_share"] < 1 and totals["graph_flops"] > totals["attention_flops_dense"]


def test_op_counts_show_what_was_removed_and_added(wan_report):
    g = wan_report.graphs[0]
    sdpa = "torch._C._nn.scaled_dot_product_attention"
    assert (g.counts_before[sdpa], g.counts_after[sdpa]) == (4, 2)
    assert g.counts_after["draftopt.tiled_attention.default"] == 2  # permutes fused (the default)
    assert "draftopt.permute_tiles.default" not in g.counts_after
    assert "draftopt.tiled_attention.default" in str(wan_report)
    assert all(s.fused for s in wan_report.sites if s.status == "rewritten")


def test_site_table_shows_each_sites_kernel_plan(wan_report, hunyuan_report):
    """Per site: the backend draftopt.kernels.plan chose and how q, k, v reach it; "-" where skipped."""
    for s in wan_report.rewritten + hunyuan_report.rewritten:  # 8x16 grids in 4x4 tiles: no padding rows
        assert (s.kernel, s.fused, s.in_place, s.kernel_reason) == ("torch", True, True, "not a CUDA device (cpu)")
        assert s.plan == "torch, fused in place"
    assert all(s.plan == "-" and s.kernel == "" for s in wan_report.skipped + hunyuan_report.skipped)
    lines = str(wan_report).splitlines()
    header = next(line for line in lines if line.lstrip().startswith("graph") and "site" in line)
    assert header.split()[-5:] == ["parallel", "kernel", "precision", "status", "reason"] and "permute" not in header
    rows = [line for line in lines if "blocks.0.attn" in line]
    assert "torch, fused in place" in rows[0] and "rewritten" in rows[0]
    assert "torch, fused in place" not in rows[1] and "skipped" in rows[1]
    for page in (hunyuan_report.to_markdown(), hunyuan_report.to_html()):
        assert "torch, fused in place" in page


def test_separate_permutes_in_the_report():
    torch._dynamo.reset()
    model = draftopt.optimize(tiny_wan(layers=1), sparsity=0.75, fuse_permute=False, **OPTS)
    with torch.no_grad():
        model(**wan_inputs())
    rep = draftopt.report(model)
    (site,) = rep.rewritten
    assert (site.kernel, site.fused, site.in_place, site.plan) == ("torch", False, False, "torch, separate permutes")
    assert "torch, separate permutes" in str(rep)
    assert rep.graphs[0].counts_after["draftopt.permute_tiles.default"] == 3


def test_graph_flops_are_counted_once_and_only_when_asked():
    calls = []
    graph = GraphRecord(index=4, count_flops=lambda: calls.append(1) or 1000)
    rep = Report([graph])
    assert not calls
    assert rep.totals()["graph_flops"] == 1000
    rep.to_json()
    assert calls == [1] and graph.flops_total == 1000 and graph.count_flops is None


def test_a_flop_count_failure_shows_in_the_summary():
    def count():
        raise NotImplementedError("no fake kernel for draftopt_test::op\nsecond line")

    site = SiteRecord("blocks.0", "sdpa", q_shape=(1, 2, 256, 16), kv_shape=(1, 2, 256, 16))
    rep = Report([GraphRecord(index=3, sites=[site], count_flops=count)])
    summary = str(rep).split("Attention sites")[0]
    assert "graph 3: FLOPs not counted (NotImplementedError: no fake kernel for draftopt_test::op)" in summary
    assert "second line" not in summary and rep.totals()["graph_flops"] is None
    data = json.loads(rep.to_json())
    assert data["graphs"][0]["flops_error"].startswith("NotImplementedError: no fake kernel")
    assert "FLOPs not counted" in Report.from_json(rep.to_json()).to_html()


def test_json_round_trips(hunyuan_report):
    text = hunyuan_report.to_json()
    back = Report.from_json(text)
    assert back.to_json() == text
    assert [s.as_dict() for s in back.sites] == [s.as_dict() for s in hunyuan_report.sites]
    assert back.sites[1].grid == (2, 8, 16) and isinstance(back.sites[1].grid, tuple)
    data = json.loads(text)
    assert data["totals"]["rewritten"] == 4 and data["graphs"][0]["config"]["policy"] == "topk"
    with pytest.raises(ValueError, match="version"):
        Report.from_json(json.dumps({"version": 99, "graphs": []}))


def test_markdown_and_html_list_every_site(hunyuan_report):
    md, page = hunyuan_report.to_markdown(), hunyuan_report.to_html()
    assert md.startswith("# draftopt report") and "| graph |" in md.replace("|   graph |", "| graph |")
    assert page.startswith("<!DOCTYPE html>") and "</html>" in page
    assert "http" not in page and "<script" not in page  # self-contained
    for s in hunyuan_report.sites:
        assert s.name in md and s.name in page


def test_code_diff_shows_sdpa_removed_and_draftopt_added(wan_report):
    diff = wan_report.code_diff()
    removed = [l for l in diff.splitlines() if l.startswith("-") and "scaled_dot_product_attention" in l]
    added = [l for l in diff.splitlines() if l.startswith("+") and "torch.ops.draftopt.tiled_attention" in l]
    assert len(removed) == 2 and len(added) == 2


_TRACED = """
import torch, draftopt
from tests.models import ToyDiT, tiny_wan, toy_inputs, wan_inputs
opts = dict(tile=(4, 4), min_tokens=0, compiler="eager")
m = draftopt.optimize(tiny_wan(), sparsity=0.5, **opts)
with torch.no_grad():
    m(**wan_inputs())
    # torch.compile's default dynamic shapes: from the second resolution on, dynamic graphs, sparse and dense
    toy = ToyDiT().eval()
    sparse = torch.compile(toy, backend="draftopt", options=dict(opts, sparsity=0.5))
    dense = torch.compile(toy, backend="draftopt", options=dict(opts, enabled=False))
    for latent in [(2, 8, 16), (2, 8, 8), (1, 8, 16)]:
        inputs = toy_inputs(latent=latent)
        sparse(*inputs)
        torch.testing.assert_close(dense(*inputs), toy(*inputs))
report = draftopt.report()
assert [s.grid for s in report.rewritten] == [(2, 8, 16)] * 2 + [(2, 4, 8)] * 2 + [(2, 4, 4)] * 2 + [(1, 4, 8)] * 2
assert all(isinstance(d, int) for s in report.sites for d in s.q_shape)  # a SymInt was a TypeError in str()
assert "dense mode" in str(report)
"""


def test_report_is_a_torch_trace_artifact(tmp_path):
    """Also with dynamic graphs, which used to fail under TORCH_TRACE (a SymInt in the artifact's JSON)."""
    script = _TRACED
    env = {**os.environ, "TORCH_TRACE": str(tmp_path)}
    res = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    logs = "".join(p.read_text() for p in tmp_path.iterdir())
    assert logs.count('"name": "draftopt_report"') == 7 and "blocks.0.attn1" in logs


def test_captured_masks_and_pictures(tmp_path):
    torch._dynamo.reset()
    draftopt.captured_masks(clear=True)
    model = draftopt.optimize(tiny_hunyuan(), sparsity=0.75, capture_masks=True, **OPTS)
    with torch.no_grad():
        model(**hunyuan_inputs())
    masks = draftopt.captured_masks(clear=True)
    assert sorted(masks) == ["single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn",
                             "transformer_blocks.0.attn", "transformer_blocks.1.attn"]
    mask = masks["transformer_blocks.0.attn"][0]
    assert mask.shape == (2, 2, 16, 16) and mask.draft_map.shape == (2, 2, 16, 16)
    paths = draftopt.save_mask_images(mask, str(tmp_path / "tb0"), heads=[0, 1], batch=1, pixels_per_block=3)
    assert len(paths) == 4 and all(os.path.getsize(p) > 0 for p in paths)
    import matplotlib.image

    img = matplotlib.image.imread(str(tmp_path / "tb0_b1_h1_mask.png"))[..., :3]
    blocks = (img[1::3, 1::3] * 255).round().astype(int)  # one pixel per block
    g = mask.geometry
    assert blocks.shape[:2] == (g.n_blocks, g.n_blocks)
    kept = (blocks == [31, 119, 180]).all(-1)
    skipped = (blocks == [255, 255, 255]).all(-1)
    text = (blocks == [255, 127, 14]).all(-1)
    assert np.array_equal(kept[:16, :16], mask.to_dense()[1, 1].numpy())
    assert np.array_equal(skipped[:16, :16], ~mask.to_dense()[1, 1].numpy())
    assert text[16:, :].all() and text[:, 16:].all()  # the text block row and column


def test_no_capture_node_unless_asked(wan_report):
    assert "record_mask" not in wan_report.graphs[0].code_after


def test_cli_on_the_examples_factory(tmp_path, capsys, monkeypatch):
    """In process (the entry point itself is run as a process by test_cli_help_and_errors)."""
    monkeypatch.chdir(REPO)
    out = tmp_path / "report.json"
    assert cli_main(["report", "examples/report_factories.py:toy_dit", "--format", "json", "--out", str(out)]) == 0
    rep = Report.from_json(out.read_text())
    assert [s.status for s in rep.sites] == ["rewritten", "rewritten"]
    assert rep.sites[0].grid == (8, 32, 32) and rep.sites[0].text_position == "start"
    assert "wrote" in capsys.readouterr().out


def test_cli_tile_words():
    from draftopt.__main__ import _tile

    assert (_tile(["auto"]), _tile(["strips"]), _tile(["4", "32"])) == ("auto", "strips", (4, 32))


def test_cli_entry_point_help():
    res = subprocess.run([sys.executable, "-m", "draftopt", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "report" in res.stdout


def test_cli_bad_arguments_print_one_line(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    for args, message in [(["--sparsity", "1.5"], "sparsity must be a number in [0, 1), got 1.5"),
                          (["--latent-shape", "8", "63", "64"], "latent_shape (8, 63, 64) does not match the latent"),
                          (["--tile", "8", "x"], "--tile takes TH TW (two ints), 'strips' or 'auto', got '8 x'"),
                          (["--tile", "strip"], "tile must be (th, tw), 'strips' or 'auto', got 'strip'")]:
        assert cli_main(["report", "examples/report_factories.py:toy_dit", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
