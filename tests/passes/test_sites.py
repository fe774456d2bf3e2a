"""The pass on small hand-written graphs: which forms are found, which are skipped and why."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from draftopt import DraftConfig
from draftopt.passes import DraftAttentionPass, find_attention_sites

GRID = (2, 4, 8)  # 64 video tokens
N = 64


def capture(fn, *inputs):
    """The Dynamo graph of fn(*inputs)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)(*inputs)
    return graphs[0]


def run_pass(fn, *inputs, **cfg):
    """(fn compiled with the pass applied, the pass's site records)."""
    cfg = DraftConfig(**{"latent_shape": GRID, "tile": (4, 4), "min_tokens": 0, "sparsity": 0.5, **cfg})
    records = []

    def backend(gm, example_inputs):
        records.extend(DraftAttentionPass(cfg)(gm))
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)
    compiled(*inputs)
    return compiled, records


def qkv(L=N, heads=2, D=16, B=1):
    return [torch.randn(B, heads, L, D) for _ in range(3)]


@pytest.mark.parametrize("call", [
    lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
    lambda q, k, v: F.scaled_dot_product_attention(query=q, key=k, value=v, scale=0.3),
    lambda q, k, v: torch.softmax((q @ k.transpose(-2, -1)) * 0.25, dim=-1) @ v,
    lambda q, k, v: (torch.matmul(q, k.transpose(-1, -2)) / 4.0).softmax(-1) @ v,
    lambda q, k, v: F.softmax(q @ k.mT, dim=-1).to(v.dtype) @ v,
], ids=["sdpa-positional", "sdpa-kwargs", "explicit-mul", "explicit-div-method", "explicit-mT-cast"])
def test_attention_forms_are_found_and_rewritten_exactly(call):
    q, k, v = qkv()
    gm, records = run_pass(call, q, k, v, sparsity=0.0)
    assert [r.status for r in records] == ["rewritten"], records
    torch.testing.assert_close(gm(q, k, v), call(q, k, v), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("call, reason", [
    (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), "causal"),
    (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.1), "dropout_p=0.1"),
    (lambda q, k, v: F.scaled_dot_product_attention(q, k[:, :, :10], v[:, :, :10]), "cross-attention: 64 queries attend to 10 keys"),
    (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(64, 64, dtype=torch.bool)),
     "mask of shape (64, 64) is not a key padding mask"),
    (lambda q, k, v: F.scaled_dot_product_attention(q[..., :2, :], k[..., :2, :], v[..., :2, :]),
     "sequence length 2 is shorter than every grid"),
    (lambda q, k, v: F.scaled_dot_product_attention(q.double(), k.double(), v.double()), "dtype torch.float64"),
])
def test_unsafe_sites_are_skipped_with_a_reason(call, reason):
    q, k, v = qkv()
    gm, records = run_pass(call, q, k, v)
    (rec,) = records
    assert rec.status == "skipped" and reason in rec.reason, rec.reason
    if "dropout" not in reason:  # dropout is random: nothing to compare
        torch.testing.assert_close(gm(q, k, v), call(q, k, v))  # unchanged


def test_key_padding_mask_site_is_rewritten():
    q, k, v = qkv(L=N + 5, B=2)
    keep = torch.ones(2, 1, 1, N + 5, dtype=torch.bool)
    keep[0, ..., -2:] = False

    def f(q, k, v, m):
        return F.scaled_dot_product_attention(torch.cat([q[:, :, :N], q[:, :, N:]], 2), k, v, attn_mask=m)

    gm, records = run_pass(f, q, k, v, keep, sparsity=0.0)
    assert records[0].status == "rewritten" and records[0].text_position == "end"
    torch.testing.assert_close(gm(q, k, v, keep), f(q, k, v, keep), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("order, position", [("text-first", "start"), ("video-first", "end")])
def test_text_position_follows_q_back_to_the_concatenation(order, position):
    video, text = torch.randn(1, N, 2, 16), torch.randn(1, 5, 2, 16)

    def f(video, text):
        parts = [text, video] if order == "text-first" else [video, text]
        x = torch.cat(parts, dim=1).permute(0, 2, 1, 3)
        return F.scaled_dot_product_attention(x, x * 2, x + 1)

    _, records = run_pass(f, video, text)
    assert (records[0].status, records[0].text_len, records[0].text_position) == ("rewritten", 5, position)


def test_text_without_a_concatenation_needs_text_position():
    q, k, v = qkv(L=N + 5)
    _, records = run_pass(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), q, k, v)
    assert "do not show where the grid lies" in records[0].reason
    assert "pass text_position='start', 'end' or the number of them before the grid" in records[0].reason
    _, records = run_pass(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), q, k, v, text_position="start")
    assert records[0].status == "rewritten" and records[0].text_position == "start"


def test_no_geometry_without_latent_shape_or_patch_embedding():
    q, k, v = qkv()
    gm = capture(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), q, k, v)
    (rec,) = DraftAttentionPass(DraftConfig(min_tokens=0))(gm)
    assert not [n for n in gm.graph.nodes if "draftopt" in str(n.target)]
    assert rec.status == "skipped" and "pass latent_shape" in rec.reason


def test_module_path_names_the_attention_module():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.Identity()

        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(self.attn(q), k, v)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])

        def forward(self, q, k, v):
            for b in self.blocks:
                q = b(q, k, v)
            return q

    gm = capture(Net(), *qkv())
    assert [s.name for s in find_attention_sites(gm.graph)] == ["blocks.0", "blocks.1"]


def test_grid_from_a_per_frame_conv2d_patch_embedding():
    """CogVideoX-style: a Conv2d over [B*T, C, H, W] frames; T comes from the batch."""

    class PerFrame(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = nn.Conv2d(4, 32, kernel_size=2, stride=2)

        def forward(self, latent):  # [B, T, C, H, W]
            B, T, C, H, W = latent.shape
            x = self.patch(latent.reshape(B * T, C, H, W))  # [B*T, 32, H/2, W/2]
            x = x.reshape(B, T, 32, -1).permute(0, 1, 3, 2).reshape(B, -1, 2, 16).transpose(1, 2)
            return F.scaled_dot_product_attention(x, x, x)

    records = []

    def backend(gm, example_inputs):
        records.extend(DraftAttentionPass(DraftConfig(tile=(4, 4), min_tokens=0, sparsity=0.0))(gm))
        return gm.forward

    torch._dynamo.reset()
    model = PerFrame()
    latent = torch.randn(2, 3, 4, 8, 16)
    out = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)(latent)
    (rec,) = records
    assert rec.status == "rewritten" and rec.grid == (3, 4, 8) and "per-frame" in rec.grid_source
    torch.testing.assert_close(out, model(latent), atol=2e-5, rtol=2e-5)


class _HistoryBlocks(nn.Module):
    """FramePack's layout: [history, video] concatenated before the blocks, the text appended inside each
    block's attention ([[history, video], text]), the output sliced back to [history, video]."""

    def __init__(self, layers=3, dim=32):
        super().__init__()
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * dim) for _ in range(layers))
        self.text_qkv = nn.ModuleList(nn.Linear(dim, 3 * dim) for _ in range(layers))

    def forward(self, history, video, text):
        x = torch.cat([history, torch.cat([history[:, :3], video], 1)], 1)  # nested, as FramePack's history scales
        for qkv, text_qkv in zip(self.qkv, self.text_qkv):
            q, k, v = (torch.cat([a, b], 1).unflatten(-1, (2, 16)).transpose(1, 2)
                       for a, b in zip(qkv(x).chunk(3, -1), text_qkv(text).chunk(3, -1)))
            out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
            x = x + out[:, :x.shape[1]]
        return x


@torch.no_grad()
def test_text_on_both_sides_of_the_grid_is_found_through_nested_concatenations():
    """History before the grid (19 + 3 tokens, two concatenations) and text after it (5): every block's
    site gets 22 tokens before and 5 after, read off the graph, and at sparsity 0 matches the original."""
    model = _HistoryBlocks()
    history, video, text = torch.randn(1, 19, 32), torch.randn(1, N, 32), torch.randn(1, 5, 32)
    compiled, records = run_pass(model, history, video, text, sparsity=0.0)
    assert [(r.status, r.text_len, r.text_position) for r in records] == [("rewritten", 27, 22)] * 3
    torch.testing.assert_close(compiled(history, video, text), model(history, video, text), atol=2e-5, rtol=2e-5)


@torch.no_grad()
def test_text_on_both_sides_sparse_matches_the_reference_op():
    from ..reference_model import reference_attention

    model = _HistoryBlocks(layers=2)
    history, video, text = torch.randn(1, 19, 32), torch.randn(1, N, 32), torch.randn(1, 5, 32)
    compiled, records = run_pass(model, history, video, text, sparsity=0.5)
    assert all(r.status == "rewritten" for r in records)
    with reference_attention(GRID, 27, 22, sparsity=0.5, tile=(4, 4)) as calls:
        want = model(history, video, text)
    assert len(calls) == 2
    torch.testing.assert_close(compiled(history, video, text), want, atol=2e-5, rtol=2e-5)


def test_two_places_for_the_grid_is_not_guessed():
    """[a, b, text] with a and b both grid-sized: the grid could be either; the site stays dense, saying so."""
    a, b, text = torch.randn(1, N, 2, 16), torch.randn(1, N, 2, 16), torch.randn(1, 5, 2, 16)

    def f(a, b, text):
        x = torch.cat([a, b, text], 1).transpose(1, 2)
        return F.scaled_dot_product_attention(x, x, x)

    _, records = run_pass(f, a, b, text)
    assert records[0].status == "skipped" and "do not show where the grid lies" in records[0].reason
    _, records = run_pass(f, a, b, text, text_position=N)
    assert (records[0].status, records[0].text_position) == ("rewritten", N)
    _, records = run_pass(f, a, b, text, text_position=N + 6)  # more than the 69 tokens off the grid
    assert records[0].status == "skipped" and "text_position=70 tokens before the grid" in records[0].reason


def test_a_convolution_per_patch_is_no_grid():
    """A Conv3d over each patch ([B * N, C, 1, 2, 2] -> [B * N, D, 1, 1, 1], JoyImageEditPlus) tells no grid:
    the site says to pass latent_shape instead of taking a 1x1x1 grid and the video for text."""
    conv = nn.Conv3d(4, 32, kernel_size=(1, 2, 2), stride=(1, 2, 2))

    def f(patches, text):
        x = conv(patches).flatten(1).reshape(1, -1, 32)
        x = torch.cat([x, text], 1).unflatten(-1, (2, 16)).transpose(1, 2)
        return F.scaled_dot_product_attention(x, x, x)

    patches, text = torch.randn(N, 4, 1, 2, 2), torch.randn(1, 5, 32)
    cfg = dict(latent_shape=None)
    _, records = run_pass(f, patches, text, **cfg)
    assert records[0].status == "skipped" and records[0].reason.startswith("no geometry: pass latent_shape")
