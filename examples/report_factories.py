"""Model factories for ``python -m draftopt report``: each returns (model, example_args).

    python -m draftopt report examples/report_factories.py:toy_dit --format md
    python -m draftopt report examples/report_factories.py:tiny_wan --min-tokens 0 --format html --out wan.html
    python -m draftopt report examples/report_factories.py:tiny_hunyuan --min-tokens 0

``toy_dit`` needs nothing beyond torch: 8192 video tokens, enough for the pass's
default ``min_tokens``. ``tiny_wan`` / ``tiny_hunyuan`` need diffusers (random
weights, tiny configs so they run on a CPU in seconds); they have 2048 video
tokens, fewer than the default ``min_tokens`` (8192), so without
``--min-tokens 0`` every site is reported as skipped.
"""

import torch
import torch.nn.functional as F
from torch import nn


class _Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, C))


class ToyVideoDiT(nn.Module):
    """Conv3d patch embedding, text tokens at the start, attention + MLP blocks."""

    def __init__(self, channels=4, dim=64, heads=4, layers=4):
        super().__init__()
        self.patch = nn.Conv3d(channels, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.text = nn.Linear(32, dim)
        self.blocks = nn.ModuleList(_Attention(dim, heads) for _ in range(layers))
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
                                  for _ in range(layers))

    def forward(self, latent, text):
        x = self.patch(latent).flatten(2).transpose(1, 2)
        h = torch.cat([self.text(text), x], dim=1)
        for attn, mlp in zip(self.blocks, self.mlps):
            h = h + attn(h)
            h = h + mlp(h)
        return h[:, text.shape[1]:]


def toy_dit():
    """8 frames x 64 x 64 latent -> 8 x 32 x 32 = 8192 video tokens (min_tokens) + 77 text tokens."""
    torch.manual_seed(0)
    return ToyVideoDiT(heads=2, layers=2).eval(), (torch.randn(1, 4, 8, 64, 64), torch.randn(1, 77, 32))


def tiny_wan():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32,
                                  in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64,
                                  num_layers=2, rope_max_seq_len=64).eval()
    return model, dict(hidden_states=torch.randn(1, 4, 4, 32, 64), timestep=torch.tensor([500]),
                       encoder_hidden_states=torch.randn(1, 16, 32), return_dict=False)


def tiny_hunyuan():
    """HunyuanVideo: text at the end with a key padding mask (a short prompt), dual- and single-stream blocks.

    4 frames x 32 x 64 latent, patch 2 -> 4 x 16 x 32 = 2048 video tokens + 16 text tokens (11 real).
    """
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
        qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8,
        rope_theta=256.0, rope_axes_dim=(8, 12, 12)).eval()
    text_mask = torch.zeros(1, 16, dtype=torch.long)
    text_mask[:, :11] = 1  # the prompt's last 5 text tokens are padding
    return model, dict(hidden_states=torch.randn(1, 4, 4, 32, 64), timestep=torch.tensor([500]),
                       encoder_hidden_states=torch.randn(1, 16, 16), encoder_attention_mask=text_mask,
                       pooled_projections=torch.randn(1, 8), guidance=torch.tensor([6000.0]), return_dict=False)
