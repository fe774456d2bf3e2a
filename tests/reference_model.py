"""Run a model eagerly with its video self-attention replaced by the reference op.

The independent route for checking the pass: no FX, no geometry inference;
the test states the geometry, and every SDPA call whose sequence it explains
goes through ``draftopt.kernels.draft_attention`` (PyTorch reference path on CPU).
"""

import contextlib

import torch.nn.functional as F

from draftopt.kernels import draft_attention


@contextlib.contextmanager
def reference_attention(grid, text_len, text_position, **draft_kwargs):
    original = F.scaled_dot_product_attention
    calls = []

    def patched(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        N = grid[0] * grid[1] * grid[2]
        if query.shape == key.shape and query.shape[2] == N + text_len and not is_causal:
            calls.append(query.shape)
            return draft_attention(query, key, value, grid, text_len=text_len, text_position=text_position,
                                   attn_mask=attn_mask, scale=scale, **draft_kwargs)
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, enable_gqa=enable_gqa)

    F.scaled_dot_product_attention = patched
    try:
        yield calls
    finally:
        F.scaled_dot_product_attention = original
