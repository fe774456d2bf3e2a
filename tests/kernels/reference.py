"""Float64 references written independently of draftopt.kernels (no shared code paths).

They loop or index token by token where the library reshapes, so a bug in a
shared helper cannot hide in both.
"""

import math

import numpy as np
import torch


def tile_of_tokens(grid, tile, text_len, text_position):
    """Per original token: its visual tile index, or -1 for text. ``text_position``: "start", "end", or
    the number of text tokens before the grid."""
    T, H, W = grid
    th, tw = tile
    nh, nw = math.ceil(H / th), math.ceil(W / tw)
    t, h, w = np.meshgrid(np.arange(T), np.arange(H), np.arange(W), indexing="ij")
    vis = (t * nh * nw + (h // th) * nw + (w // tw)).reshape(-1)
    before = {"start": text_len, "end": 0}.get(text_position, text_position)
    ids = np.concatenate([np.full(before, -1), vis, np.full(text_len - before, -1)])
    return torch.from_numpy(ids)


def pool(x, grid, tile, text_len, text_position):
    """Mean of x [B, H, L, D] over each tile's real tokens -> [B, H, S, D] float64."""
    ids = tile_of_tokens(grid, tile, text_len, text_position)
    S = int(ids.max()) + 1
    vis = ids >= 0
    xs = x.double()[:, :, vis]
    sums = torch.zeros(*x.shape[:2], S, x.shape[-1], dtype=torch.float64).index_add_(2, ids[vis], xs)
    counts = torch.bincount(ids[vis], minlength=S).double()
    return sums / counts[:, None]


def draft_map(qp, kp, scale):
    return torch.softmax(qp.double() @ kp.double().transpose(-1, -2) * scale, dim=-1)


def percentile_keep(P, sparsity):
    """The paper's rule, per (batch, head): keep the ceil((1-s)*S*S) largest map entries (+ diagonal)."""
    P = P.double().numpy()
    B, H, S, _ = P.shape
    n = max(1, math.ceil(round((1 - sparsity) * S * S, 6)))
    keep = np.zeros(P.shape, dtype=bool)
    for b in range(B):
        for h in range(H):
            threshold = np.sort(P[b, h].reshape(-1))[::-1][n - 1]
            keep[b, h] = P[b, h] >= threshold
            np.fill_diagonal(keep[b, h], True)
    return torch.from_numpy(keep)


def percentile_keep_exact(P, sparsity):
    """The paper's rule with exactly ceil((1-s)*S*S) entries per (batch, head) (+ diagonal): a stable
    descending float64 sort, so NaN ranks first, -0.0 ties +0.0 and ties go in row-major order."""
    B, H, S, _ = P.shape
    n = max(1, math.ceil(round((1 - sparsity) * S * S, 6)))
    flat = P.double().reshape(B, H, S * S)
    order = torch.sort(flat, dim=-1, descending=True, stable=True).indices[..., :n]
    keep = torch.zeros(flat.shape, dtype=torch.bool).scatter_(-1, order, True).reshape(B, H, S, S)
    return keep | torch.eye(S, dtype=torch.bool)


def topk_keep(P, sparsity):
    P = P.double().numpy()
    S = P.shape[-1]
    k = max(1, math.ceil(round((1 - sparsity) * S, 6)))
    keep = np.zeros(P.shape, dtype=bool)
    for idx in np.ndindex(*P.shape[:3]):
        row = P[idx].copy()
        row[idx[2]] = np.inf
        keep[idx][np.argsort(-row, kind="stable")[:k]] = True
    return torch.from_numpy(keep)


def cdf_keep(P, sparsity, threshold):
    P = P.double().numpy()
    S = P.shape[-1]
    budget = max(1, math.ceil(round((1 - sparsity) * S, 6)))
    keep = np.zeros(P.shape, dtype=bool)
    for idx in np.ndindex(*P.shape[:3]):
        order = np.argsort(-P[idx], kind="stable")
        mass = 0.0
        for rank, j in enumerate(order):
            if mass >= threshold or rank >= budget:
                break
            keep[idx][j] = True
            mass += P[idx][j]
        keep[idx][idx[2]] = True
    return torch.from_numpy(keep)


def token_mask(block_keep, grid, tile, text_len, text_position):
    """Block map [B, H, S, S] -> token map [B, H, L, L]; text rows and columns dense."""
    ids = tile_of_tokens(grid, tile, text_len, text_position)
    text = ids < 0
    safe = ids.clamp(min=0)
    allowed = block_keep[:, :, safe][:, :, :, safe]
    return allowed | text[:, None] | text[None, :]


def attention(q, k, v, allowed=None, key_keep=None, scale=None):
    """Dense float64 attention; allowed [B|1, H|1, L, L] and key_keep [B, L] booleans."""
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    if key_keep is not None:
        s = s.masked_fill(~key_keep[:, None, None, :], float("-inf"))
    return torch.softmax(s, dim=-1) @ v
