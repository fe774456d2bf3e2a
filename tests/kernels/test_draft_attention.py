"""The composite draft_attention: all five stages against dense attention."""

import pytest
import torch
import torch.nn.functional as F

from draftopt.kernels import draft_attention
from draftopt.kernels.sparsity import keep_count

from . import reference as ref
from .tolerances import assert_close

# grid, text_len, text_position, B, H, D: covers each listed value at least once
GEOMETRIES = [
    ((3, 13, 27), 0, "end", 1, 3, 64),
    ((3, 13, 27), 7, "start", 2, 1, 96),
    ((3, 13, 27), 77, "end", 3, 3, 128),
    ((3, 13, 27), 256, "start", 1, 24, 64),
    ((1, 8, 16), 0, "end", 2, 24, 128),
    ((1, 8, 16), 7, "end", 3, 1, 64),
    ((1, 8, 16), 77, "start", 1, 3, 96),
    ((1, 8, 16), 256, "end", 2, 3, 64),
    ((1, 8, 16), 512, "start", 1, 2, 64),  # the longest prompt supported: 4 text blocks
    ((2, 13, 27), 130 + 77, 130, 2, 2, 64),  # text on both sides of the grid (FramePack: history, grid, text)
]
GEOM_IDS = [f"{'x'.join(map(str, g))}-text{t}@{p}-B{b}H{h}D{d}" for g, t, p, b, h, d in GEOMETRIES]


def qkv(B, H, L, D, device, dtype=torch.float32):
    return [torch.randn(B, H, L, D, device=device).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("grid, text_len, pos, B, H, D", GEOMETRIES, ids=GEOM_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparsity_zero_equals_dense_sdpa(device, grid, text_len, pos, B, H, D, dtype):
    L = grid[0] * grid[1] * grid[2] + text_len
    q, k, v = qkv(B, H, L, D, device, dtype)
    out = draft_attention(q, k, v, grid, text_len=text_len, text_position=pos, sparsity=0.0)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, ref.attention(q.cpu(), k.cpu(), v.cpu()), dtype)


@pytest.mark.parametrize("grid, text_len, pos, B, H, D", GEOMETRIES[:-1:2] + GEOMETRIES[-1:],
                         ids=GEOM_IDS[:-1:2] + GEOM_IDS[-1:])
@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.95])
@pytest.mark.parametrize("policy", ["percentile", "topk", "cdf"])
def test_sparse_equals_token_masked_dense(device, grid, text_len, pos, B, H, D, sparsity, policy):
    L = grid[0] * grid[1] * grid[2] + text_len
    q, k, v = qkv(B, H, L, D, device)
    out, mask = draft_attention(q, k, v, grid, text_len=text_len, text_position=pos, tile=(4, 8),
                                sparsity=sparsity, policy=policy, return_mask=True)
    allowed = ref.token_mask(mask.to_dense().cpu(), grid, (4, 8), text_len, pos)
    assert_close(out, ref.attention(q.cpu(), k.cpu(), v.cpu(), allowed), torch.float32)
    S = mask.shape[-1]
    kept = 1.0 - mask.sparsity()
    if policy == "percentile":  # the top ceil((1-s)S^2) entries, plus at most S diagonal tiles
        assert keep_count(sparsity, S * S) / (S * S) - 1e-9 <= kept <= (keep_count(sparsity, S * S) + S) / (S * S)
    elif policy == "topk":  # exactly ceil((1-s)S) per query tile
        assert kept == pytest.approx(keep_count(sparsity, S) / S)
    else:  # cdf: at most the budget per query tile, plus the diagonal
        assert kept <= (keep_count(sparsity, S) + 1) / S


def test_mask_is_the_papers_selection_on_the_draft_map(device):
    grid = (2, 16, 32)
    q, k, v = qkv(2, 3, 2 * 16 * 32, 64, device)
    _, mask = draft_attention(q, k, v, grid, sparsity=0.9, policy="percentile", return_mask=True)
    qp = ref.pool(q.cpu(), grid, (8, 16), 0, "end")
    kp = ref.pool(k.cpu(), grid, (8, 16), 0, "end")
    torch.testing.assert_close(mask.draft_map.double().cpu(), ref.draft_map(qp, kp, 64**-0.5), atol=2e-4, rtol=2e-3)
    assert torch.equal(mask.to_dense().cpu(), ref.percentile_keep(mask.draft_map.cpu(), 0.9))


@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
@pytest.mark.parametrize("sparsity", [0.0, 0.75])
def test_key_padding_mask_hides_text(device, mask_kind, sparsity):
    grid, text_len = (2, 8, 16), 77
    L = 2 * 8 * 16 + text_len
    q, k, v = qkv(2, 3, L, 64, device)
    keep = torch.ones(2, L, dtype=torch.bool, device=device)
    keep[0, -50:] = False  # batch 0's prompt is short: its last 50 text tokens are padding
    keep[1, -3:] = False
    m = keep[:, None, None, :]  # HunyuanVideo-style [B, 1, 1, L]
    if mask_kind == "additive":
        m = torch.zeros(keep.shape, device=device).masked_fill(~keep, float("-inf"))[:, None, None, :]
    out, mask = draft_attention(q, k, v, grid, text_len=text_len, sparsity=sparsity, attn_mask=m, return_mask=True)
    allowed = ref.token_mask(mask.to_dense().cpu(), grid, (8, 16), text_len, "end")
    assert_close(out, ref.attention(q.cpu(), k.cpu(), v.cpu(), allowed, keep.cpu()), torch.float32)
    if sparsity == 0.0:
        dense = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        assert_close(out, dense.cpu(), torch.float32)


def test_requires_grad_is_refused(device):
    q, k, v = qkv(1, 1, 128, 64, device)
    q.requires_grad_(True)
    with pytest.raises(RuntimeError, match="inference-only"):
        draft_attention(q, k, v, (1, 8, 16))
    with torch.no_grad():
        draft_attention(q, k, v, (1, 8, 16))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sparsity=1.5), "sparsity must be .* got 1.5"),
        (dict(policy="best"), "unknown policy 'best'"),
        (dict(tile=(3, 7)), r"tile \(3, 7\)"),
        (dict(grid=(2, 8, 16)), "length 135 does not match .* 263"),
        (dict(grid=(2, 8, 16), text_len=None), "2x8x16 has 256 tokens, more than the sequence's 135"),
        (dict(text_len=None), "grid 1x8x16 has 128 tokens, the sequence 135; .* pass text_len=7"),
        (dict(text_len=5), "length 135 .* 133"),
        (dict(grid=2), "grid must be three positive ints .* got 2"),
        (dict(grid=(8, 16)), r"grid must be three positive ints .* got \(8, 16\)"),
        (dict(text_position="left"), "text_position"),
        (dict(attn_mask=torch.ones(135, 135, dtype=torch.bool)), "not a key padding mask"),
    ],
)
def test_bad_arguments_raise_value_error(device, kwargs, match):
    q, k, v = qkv(1, 2, 135, 64, device)  # 1x8x16 grid + 7 text tokens
    kwargs = {"grid": (1, 8, 16), "text_len": 7, **kwargs}
    if "attn_mask" in kwargs:
        kwargs["attn_mask"] = kwargs["attn_mask"].to(device)
    with pytest.raises(ValueError, match=match):
        draft_attention(q, k, v, **kwargs)


def test_cross_attention_shapes_rejected(device):
    q = torch.randn(1, 2, 128, 64, device=device)
    kv = torch.randn(1, 2, 77, 64, device=device)
    with pytest.raises(ValueError, match="self-attention"):
        draft_attention(q, kv, kv, (1, 8, 16))


def test_large_head_dim_rejected(device):
    q = torch.randn(1, 1, 128, 256, device=device)
    with pytest.raises(ValueError, match="head dim 256"):
        draft_attention(q, q, q, (1, 8, 16))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64])
def test_non_float_inputs_refused_on_every_device(device, dtype):
    q = torch.ones(1, 1, 135, 64, device=device).to(dtype)
    with pytest.raises(ValueError, match=f"q has dtype {dtype}; draftopt takes"):
        draft_attention(q, q, q, (1, 8, 16), text_len=7)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8])
def test_integer_masks_refused(device, dtype):
    q, k, v = qkv(1, 1, 135, 64, device)
    mask = torch.ones(1, 1, 1, 135, dtype=dtype, device=device)
    with pytest.raises(ValueError, match=f"attn_mask has dtype {dtype}; pass a bool mask"):
        draft_attention(q, k, v, (1, 8, 16), text_len=7, attn_mask=mask)


@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_and_inf_propagate_as_in_dense_sdpa_at_sparsity_zero(device, where, value, dtype):
    """A non-finite value planted in q, k or v: exactly the output rows (and entries) are NaN or Inf
    that dense attention by its definition makes so: SDPA's math path in float64 (the PyTorch path used
    to turn a NaN key into zeros). On the GPU this runs the Triton kernel (float32) and on sm_90 the
    Gluon kernel (bfloat16). The fused dense kernels are no reference here: on an H200 CUDA's float32
    SDPA makes all 263 rows of the head NaN for one Inf key, the definition 147 (2026-12-01)."""
    grid, text_len = (2, 8, 16), 7
    q, k, v = qkv(1, 2, 2 * 8 * 16 + text_len, 64, device, dtype)
    t = {"q": q, "k": k, "v": v}[where]
    t[0, 1, 37, 5] = value
    out = draft_attention(q, k, v, grid, text_len=text_len, sparsity=0.0)
    dense = ref.attention(q.cpu(), k.cpu(), v.cpu())
    assert dense.isfinite().logical_not().any()  # the planted value reaches the output
    assert torch.equal(out.isfinite().cpu(), dense.isfinite())
    assert torch.equal(out.isnan().cpu(), dense.isnan())


@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("policy", ["percentile", "topk", "cdf"])
def test_nan_reaches_the_rows_whose_kept_blocks_hold_it(device, where, policy):
    """At sparsity > 0 sparse attention is dense attention restricted to the kept blocks, NaN included:
    a NaN makes exactly the rows NaN that the masked float64 reference makes NaN with the same block
    mask. A NaN in q or k also reaches the draft map; the selection still returns valid indices."""
    grid, text_len = (2, 16, 32), 7
    g_tokens = 2 * 16 * 32
    q, k, v = qkv(1, 2, g_tokens + text_len, 64, device)
    {"q": q, "k": k, "v": v}[where][0, 1, 300, 5] = float("nan")
    out, mask = draft_attention(q, k, v, grid, text_len=text_len, sparsity=0.75, policy=policy,
                                return_mask=True)
    S = mask.kv_idx.shape[-2]
    assert ((mask.kv_idx >= 0) & (mask.kv_idx < S)).all() and (mask.kv_cnt >= 1).all()
    allowed = ref.token_mask(mask.to_dense().cpu(), grid, (8, 16), text_len, "end")
    q, k, v = q.cpu(), k.cpu(), v.cpu()
    # NaN in q or k arrives through the scores; a NaN in v at the entries (row, d) of rows that keep its key
    # (an unkept key is never read: a masked matmul would spread 0 * NaN to every row)
    want = ref.attention(q, k, v.nan_to_num(0.0), allowed).isnan() | (allowed.double() @ v.isnan().double() > 0)
    assert want.any() and not want.all()
    assert torch.equal(out.isnan().cpu(), want)
