"""ONNX export (CPU): each video self-attention site one draftopt.DraftAttention node that onnxruntime runs
through its function body, with no plug-in, computing what PyTorch's draftopt computes.

Needs onnx, onnxscript and onnxruntime (the test extra). At sparsity 0.9 onnxruntime's TopK and torch.topk
must pick the same blocks: random weights and inputs make ties in the score maps improbable.
"""

import ast
import math
import os

import pytest
import torch

import draftopt
from draftopt.backend import DenseSitesError, DraftoptWarning
from draftopt.kernels import Geometry, draft_attention
from draftopt.kernels.sparsity import keep_count

from ..models import ToyDiT, hunyuan_inputs, tiny_hunyuan, tiny_wan, toy_inputs, wan_inputs

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("diffusers")

# Tiny models have 2x8x16 = 256 video tokens: tiles of 4x4 give 16 tiles.
OPTS = dict(tile=(4, 4), min_tokens=0)
SRC = os.path.join(os.path.dirname(draftopt.__file__))


def rel(got, want) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def session(model):
    options = ort.SessionOptions()
    options.log_severity_level = 3  # onnxruntime's constant-folding notes are not failures
    data = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def run_file(path: str, inputs: dict) -> torch.Tensor:
    sess = session(path)
    feed = {i.name: inputs[i.name].numpy() for i in sess.get_inputs()}
    return torch.from_numpy(sess.run(None, feed)[0])


def draftopt_nodes(path: str) -> list:
    return [n for n in onnx.load(path).graph.node if n.domain == "draftopt"]


def attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@torch.no_grad()
def pytorch_draftopt(model, inputs: dict, **config) -> torch.Tensor:
    return draftopt.optimize(model, compiler="eager", **OPTS, **config)(**inputs)[0]


# -- whole models ---------------------------------------------------------------------------------
@torch.no_grad()
def test_wan_sparse_export_runs_in_onnxruntime_with_a_skipped_site_dense(tmp_path):
    wan, inputs = tiny_wan(), wan_inputs()
    path = str(tmp_path / "wan.onnx")
    exported = draftopt.export_onnx(wan, (), path, example_kwargs=inputs, sparsity=0.9, dense_layers=1,
                                    optimize=False, **OPTS)
    onnx.checker.check_model(path, full_check=True)
    (node,) = draftopt_nodes(path)  # blocks.0.attn1 stays dense (dense_layers=1), attn2 is cross-attention
    assert node.op_type == "DraftAttention" and node.name == "draftopt/blocks.1.attn1"
    a = attrs(node)
    assert (a["T"], a["H"], a["W"], a["tile_h"], a["tile_w"], a["text_len"]) == (2, 8, 16, 4, 4, 0)
    assert a["policy"] == b"mass" and a["sparsity"] == pytest.approx(0.9) and a["keep"] == keep_count(0.9, 16 * 16)
    # The three sites left as scaled_dot_product_attention are plain attention: one Softmax each.
    assert sum(n.op_type == "Softmax" for n in onnx.load(path).graph.node) == 3
    got = run_file(path, inputs)
    assert rel(got, pytorch_draftopt(wan, inputs, sparsity=0.9, dense_layers=1)) < 1e-4
    assert rel(got, wan(**inputs)[0]) > 1e-3  # sparsity changed the output
    sites = {s.name: s for s in draftopt.report(exported).sites}
    assert sites["blocks.0.attn1"].status == "skipped" and "dense_layers=1" in sites["blocks.0.attn1"].reason
    assert sites["blocks.1.attn1"].status == "rewritten"
    # The report names the ONNX node next to the site, from the result and from the file alike.
    assert exported.onnx_nodes == {"blocks.1.attn1": "draftopt/blocks.1.attn1"}
    from_file = draftopt.report(path)
    assert from_file.graphs[0].onnx_nodes == exported.onnx_nodes
    row = next(line for line in str(from_file).splitlines() if "blocks.1.attn1 " in line)
    assert "draftopt/blocks.1.attn1" in row and "onnx node" in str(from_file)


@torch.no_grad()
def test_strips_export_carries_the_flattened_grid(tmp_path):
    """tile="strips": the node's grid is the frame flattened, (T, 1, H * W) with (1, 128) tiles, and the file
    computes what the PyTorch pass computes."""
    wan, inputs = tiny_wan(layers=1), wan_inputs()
    path = str(tmp_path / "wan_strips.onnx")
    opts = dict(OPTS, tile="strips")
    draftopt.export_onnx(wan, (), path, example_kwargs=inputs, sparsity=0.5, optimize=False, **opts)
    nodes = draftopt_nodes(path)
    assert nodes, "no DraftAttention node"
    a = attrs(nodes[0])
    assert (a["T"], a["H"], a["W"], a["tile_h"], a["tile_w"]) == (2, 1, 128, 1, 128)
    want = draftopt.optimize(wan, compiler="eager", sparsity=0.5, **opts)(**inputs)[0]
    assert rel(run_file(path, inputs), want) < 1e-4


@torch.no_grad()
def test_sparsity_zero_through_torch_onnx_export_equals_the_original(tmp_path):
    wan, inputs = tiny_wan(layers=1), wan_inputs()
    ep = draftopt.export_program(wan, (), example_kwargs=inputs, sparsity=0.0, **OPTS)
    assert [s.status for s in draftopt.report(ep).sites] == ["rewritten", "skipped"]
    program = torch.onnx.export(ep, dynamo=True, custom_translation_table=draftopt.onnx_translation_table())
    draftopt.add_onnx_functions(program)
    path = str(tmp_path / "wan0.onnx")
    program.save(path)
    onnx.checker.check_model(path, full_check=True)
    assert [n.op_type for n in draftopt_nodes(path)] == ["DraftAttention"]
    assert {f.name for f in onnx.load(path).functions} >= {"DraftAttention", "TileSums"}
    assert rel(run_file(path, inputs), wan(**inputs)[0]) < 1e-4


HUNYUAN_SITES = ["draftopt/transformer_blocks.0.attn", "draftopt/single_transformer_blocks.0.attn"]


@pytest.mark.parametrize("sparsity, layers, sites", [(0.9, 1, HUNYUAN_SITES), (0.0, 0, HUNYUAN_SITES[1:])])
@torch.no_grad()
def test_hunyuan_export_with_padded_text(tmp_path, sparsity, layers, sites):
    hy, inputs = tiny_hunyuan(layers=layers, single_layers=1), hunyuan_inputs()  # dual- and single-stream
    path = str(tmp_path / "hy.onnx")
    exported = draftopt.export_onnx(hy, (), path, example_kwargs=inputs, sparsity=sparsity, optimize=False, **OPTS)
    onnx.checker.check_model(path, full_check=True)
    nodes = draftopt_nodes(path)
    assert [n.name for n in nodes] == sites
    assert all(attrs(n)["text_len"] == 8 and attrs(n)["text_before"] == 0 for n in nodes)  # text at the end
    refiner = draftopt.report(exported).skipped
    assert [s.name for s in refiner] == ["context_embedder.token_refiner.refiner_blocks.0.attn"]
    assert not refiner[0].candidate  # text-only attention: no warning either
    got = run_file(path, inputs)
    assert rel(got, exported.program.module()(**inputs)[0]) < 1e-4  # the draftopt op, run by PyTorch
    if sparsity == 0.0:
        assert rel(got, hy(**inputs)[0]) < 1e-4


@torch.no_grad()
def test_explicit_softmax_attention_with_text_first(tmp_path):
    toy, args = ToyDiT().eval(), toy_inputs()  # softmax(q @ k^T * s) @ v, text before the video tokens
    path = str(tmp_path / "toy.onnx")
    draftopt.export_onnx(toy, args, path, sparsity=0.75, optimize=False, **OPTS)
    nodes = draftopt_nodes(path)
    assert [n.name for n in nodes] == ["draftopt/blocks.0", "draftopt/blocks.1"]
    assert attrs(nodes[0])["text_before"] == 7 and attrs(nodes[0])["text_len"] == 7
    assert not any(n.op_type == "Softmax" for n in onnx.load(path).graph.node)  # the explicit chains are gone
    sess = session(path)
    got = torch.from_numpy(sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)})[0])
    want = draftopt.optimize(toy, compiler="eager", sparsity=0.75, **OPTS)(*args)
    assert rel(got, want) < 1e-4


@torch.no_grad()
def test_sites_that_cannot_be_rewritten_are_exported_dense_with_the_reasons(tmp_path):
    toy, args = ToyDiT().eval(), toy_inputs()
    path = str(tmp_path / "dense.onnx")
    with pytest.warns(DraftoptWarning) as caught:  # the default min_tokens: 64 video tokens are too few
        exported = draftopt.export_onnx(toy, args, path, tile=(4, 4), optimize=False)
    (message,) = [str(w.message) for w in caught if issubclass(w.category, DraftoptWarning)]
    assert "0 of 2 video self-attention sites exported as draft attention; 2 exported dense" in message
    assert "blocks.0: too few tokens: 64 visual tokens < min_tokens=8192" in message and "blocks.1: too few" in message
    assert draftopt_nodes(path) == [] and exported.onnx_nodes == {}
    assert [s.reason for s in draftopt.report(path).skipped] == [s.reason for s in exported.record.sites]
    sess = session(path)
    got = torch.from_numpy(sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)})[0])
    assert rel(got, toy(*args)) < 1e-4
    with pytest.raises(DenseSitesError, match="blocks.0: too few tokens"):
        draftopt.export_program(toy, args, tile=(4, 4), strict=True)


# -- the node on its own ------------------------------------------------------------------------
def one_node_model(q_shape, geom: Geometry, scale, sparsity, policy, bias_shape, dtype=onnx.TensorProto.FLOAT,
                   cdf_threshold=0.9):
    from draftopt.onnx_ops import selection_attributes

    T, H, W = geom.grid
    node = onnx.helper.make_node(
        "DraftAttention", ["q", "k", "v", "key_bias"], ["out"], domain="draftopt", T=T, H=H, W=W,
        tile_h=geom.tile[0], tile_w=geom.tile[1], text_len=geom.text_len, text_before=geom.prefix_len,
        scale=scale, sparsity=sparsity, policy=policy, cdf_threshold=cdf_threshold,
        **selection_attributes(policy, sparsity, geom.n_tiles))

    def value(name, shape, t=dtype):
        return onnx.helper.make_tensor_value_info(name, t, list(shape))

    graph = onnx.helper.make_graph([node], "one_site", [value("q", q_shape), value("k", q_shape), value("v", q_shape),
                                                         value("key_bias", bias_shape, onnx.TensorProto.FLOAT)],
                                   [value("out", q_shape)])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18),
                                                         onnx.helper.make_opsetid("draftopt", 1)])
    draftopt.add_onnx_functions(model)
    onnx.checker.check_model(model, full_check=True)
    return model


CASES = [  # grid, tile, text_len, text_position, key padding mask (no text, no mask: the Wan tests)
    ((2, 7, 13), (4, 4), 5, "start", "bool"),  # partial edge tiles, text first
    ((1, 12, 20), (8, 16), 9, "end", "float"),  # tiles of 128, 32, 64 and 16 tokens, an additive mask
    ((2, 7, 13), (4, 4), 6 + 5, 6, "bool"),  # text on both sides of the grid (FramePack: history, grid, text)
]


@pytest.mark.parametrize("policy", ["mass", "percentile", "topk", "cdf"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_draft_attention_node_computes_what_the_pytorch_op_computes(policy, case):
    grid, tile, text_len, position, mask_kind = CASES[case]
    geom = Geometry(grid, tile, text_len, position)
    B, heads, D = 2, 2, 16
    L = geom.seq_len
    q, k, v = torch.randn(3, B, heads, L, D).unbind(0)
    mask, bias = None, torch.zeros(1, 1, 1, L)
    if mask_kind:
        keep = torch.ones(B, 1, 1, L, dtype=torch.bool)
        keep[0, ..., -3:] = False  # the first sample's last tokens are padding
        bias = torch.zeros(B, 1, 1, L).masked_fill(~keep, -math.inf)
        mask = keep if mask_kind == "bool" else bias
    for sparsity in (0.0, 0.5, 0.9) if policy == "cdf" else (0.5, 0.9):  # cdf at 0: no cutoff
        want = draft_attention(q, k, v, grid, tile=tile, text_len=text_len, text_position=position,
                               sparsity=sparsity, policy=policy, attn_mask=mask, scale=0.3)
        sess = session(one_node_model(q.shape, geom, 0.3, sparsity, policy, bias.shape))
        got = sess.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "key_bias": bias.numpy()})[0]
        assert rel(torch.from_numpy(got), want) < 1e-5, (policy, sparsity)


def test_draft_attention_node_in_half_precision():
    geom = Geometry((2, 8, 16), (4, 4), 3, "end")
    q, k, v = torch.randn(3, 1, 2, geom.seq_len, 32).half().unbind(0)
    want = draft_attention(q, k, v, geom.grid, tile=geom.tile, text_len=3, sparsity=0.75, scale=0.2)
    bias = torch.zeros(1, 1, 1, geom.seq_len)
    sess = session(one_node_model(q.shape, geom, 0.2, 0.75, "mass", bias.shape, dtype=onnx.TensorProto.FLOAT16))
    got = sess.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "key_bias": bias.numpy()})[0]
    assert got.dtype.name == "float16" and rel(torch.from_numpy(got), want) < 2e-3


# -- errors and imports ---------------------------------------------------------------------------
@pytest.mark.parametrize("option, value", [("max_error", 0.05), ("runtime_sparsity", True), ("capture_masks", True)])
def test_export_refuses_options_a_file_cannot_carry(option, value):
    with pytest.raises(ValueError, match=f"{option}=.* is not supported by draftopt's export"):
        draftopt.export_program(torch.nn.Linear(2, 2), (torch.randn(1, 2),), **{option: value})


def test_export_refuses_bad_arguments(tmp_path):
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="example_args must be a tuple"):
        draftopt.export_program(model, torch.randn(1, 2))
    with pytest.raises(ValueError, match="pass the original nn.Module"):
        draftopt.export_program(torch.compile(model), (torch.randn(1, 2),))
    with pytest.raises(ValueError, match="unknown draftopt option"):
        draftopt.export_onnx(model, (torch.randn(1, 2),), str(tmp_path / "x.onnx"), sparsity_=0.5)
    with pytest.raises(ValueError, match="opset_version must be an int >= 18"):
        draftopt.export_onnx(model, (torch.randn(1, 2),), str(tmp_path / "x.onnx"), opset_version=17)
    plain = str(tmp_path / "plain.onnx")
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([], "g", [x], [x])), plain)
    with pytest.raises(ValueError, match="has no draftopt report"):
        draftopt.report(plain)


def test_import_draftopt_does_not_import_onnx():
    """onnx and onnxscript are optional: only onnx_ops.py imports them at module level."""
    for name in ("__init__.py", "export.py", "api.py", "report.py"):
        tree = ast.parse(open(os.path.join(SRC, name)).read())
        for stmt in tree.body:
            if isinstance(stmt, ast.Import):
                modules = [a.name for a in stmt.names]
            elif isinstance(stmt, ast.ImportFrom):
                modules = [stmt.module or ""]
            else:
                continue
            assert not any(m.split(".")[0] in ("onnx", "onnxscript", "onnxruntime", "onnx_ops") for m in modules), name
