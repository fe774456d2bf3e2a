"""GPU-only: real-model sizes, torch.compile, CUDA graphs, no host synchronization."""

import pytest
import torch
import torch.nn.functional as F

from draftopt.kernels import draft_attention

from ..helpers import poison_outputs, rel_err

pytestmark = pytest.mark.gpu


def masked_dense(q, k, v, allowed, key_keep=None):
    """fp32 dense attention, one head at a time (a [L, L] score matrix fits; [H, L, L] may not)."""
    out = torch.empty_like(q, dtype=torch.float32)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            m = allowed[b, h]
            if key_keep is not None:
                m = m & key_keep[b][None, :]
            out[b, h] = F.scaled_dot_product_attention(
                q[b, h].float()[None], k[b, h].float()[None], v[b, h].float()[None], attn_mask=m[None])[0]
    return out


def video_qkv(grid, text_len, B=1, H=12, D=128, dtype=torch.bfloat16):
    L = grid[0] * grid[1] * grid[2] + text_len
    return [torch.randn(B, H, L, D, device="cuda", dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("policy", ["percentile", "topk", "cdf"])
def test_wan_like_size_bf16(policy):
    grid, text_len = (8, 30, 52), 256
    q, k, v = video_qkv(grid, text_len)
    with poison_outputs():
        out, mask = draft_attention(q, k, v, grid, text_len=text_len, text_position="end",
                                    sparsity=0.9, policy=policy, return_mask=True)
    allowed = mask.to_token_mask()
    want = masked_dense(q, k, v, allowed)
    assert not out.isnan().any()
    assert rel_err(out, want) < 1e-2


def test_sparsity_zero_matches_sdpa_at_size():
    grid, text_len = (8, 30, 52), 256
    q, k, v = video_qkv(grid, text_len, B=2)
    keep = torch.ones(2, q.shape[2], dtype=torch.bool, device="cuda")
    keep[1, -100:] = False
    out = draft_attention(q, k, v, grid, text_len=text_len, sparsity=0.0, attn_mask=keep[:, None, None, :])
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=keep[:, None, None, :])
    assert rel_err(out, want) < 1e-2


def test_torch_compile_fullgraph_matches_eager():
    grid, text_len = (4, 16, 32), 77
    q, k, v = video_qkv(grid, text_len, B=2, H=4)

    def f(q, k, v):
        return draft_attention(q, k, v, grid, text_len=text_len, text_position="start", sparsity=0.8)

    eager = f(q, k, v)
    compiled = torch.compile(f, fullgraph=True)(q, k, v)
    assert rel_err(compiled, eager) < 1e-3


def test_cuda_graph_capture_and_no_host_sync():
    grid, text_len = (4, 16, 32), 77
    q, k, v = video_qkv(grid, text_len, B=2, H=4)

    def f():
        return draft_attention(q, k, v, grid, text_len=text_len, sparsity=0.9)

    f()  # warm-up (compiles the kernels)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        f()  # raises if any stage synchronizes with the host
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = f()
    for t in (q, k, v):  # new inputs in the captured buffers
        t.copy_(torch.randn_like(t))
    graph.replay()
    assert rel_err(out, f()) < 1e-3
