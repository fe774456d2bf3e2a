"""Small models for the graph-layer tests: diffusers' Wan and HunyuanVideo with
tiny configs (random weights, CPU-fast), hand-written toy DiTs (a Conv3d or a Linear
patch embedding) and one bare SDPA layer."""

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn


def tiny_wan(heads=2, head_dim=16, layers=2):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
        out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64).eval()


def wan_inputs(latent=(2, 16, 32), batch=1, text_len=8, device="cpu", dtype=torch.float32):
    return dict(hidden_states=torch.randn(batch, 4, *latent, device=device, dtype=dtype),
                timestep=torch.full((batch,), 500, device=device),
                encoder_hidden_states=torch.randn(batch, text_len, 32, device=device, dtype=dtype),
                return_dict=False)


def tiny_hunyuan(heads=2, head_dim=16, layers=2, single_layers=2):
    from diffusers import HunyuanVideoTransformer3DModel

    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=heads, attention_head_dim=head_dim,
        num_layers=layers, num_single_layers=single_layers, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2,
        patch_size_t=1, qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8,
        rope_theta=256.0, rope_axes_dim=(head_dim - 12, 6, 6) if head_dim == 16 else (16, 56, 56)).eval()


def hunyuan_inputs(latent=(2, 16, 32), batch=2, text_len=8, valid=(5, 8), device="cpu", dtype=torch.float32):
    mask = torch.zeros(batch, text_len, dtype=torch.long, device=device)
    for b in range(batch):
        mask[b, : valid[b % len(valid)]] = 1  # a short prompt: its last text tokens are padding
    return dict(hidden_states=torch.randn(batch, 4, *latent, device=device, dtype=dtype),
                timestep=torch.full((batch,), 500, device=device),
                encoder_hidden_states=torch.randn(batch, text_len, 16, device=device, dtype=dtype),
                encoder_attention_mask=mask, pooled_projections=torch.randn(batch, 8, device=device, dtype=dtype),
                guidance=torch.full((batch,), 6000.0, device=device, dtype=dtype), return_dict=False)


def tiny_sd3(heads=2, head_dim=16, layers=2):
    """An image DiT (Stable Diffusion 3): a Conv2d patch embedding, text at the end of the joint attention."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, out_channels=4, num_layers=layers, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=32, caption_projection_dim=heads * head_dim,
        pooled_projection_dim=16, pos_embed_max_size=32).eval()


def sd3_inputs(latent=(16, 32), batch=1, text_len=8):
    return dict(hidden_states=torch.randn(batch, 4, *latent), encoder_hidden_states=torch.randn(batch, text_len, 32),
                pooled_projections=torch.randn(batch, 16), timestep=torch.full((batch,), 500.0), return_dict=False)


def tiny_flux(heads=2, head_dim=16, layers=1, single_layers=1):
    """An image DiT (Flux): packed tokens [B, H * W, C] (the pipeline packs 2x2 latent patches; config
    patch_size=1), a Linear embedding, text at the start of the joint attention."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=layers, num_single_layers=single_layers, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=32, pooled_projection_dim=16,
        axes_dims_rope=(head_dim - 12, 6, 6)).eval()


def flux_inputs(grid=(8, 16), batch=1, text_len=8):
    """Packed tokens of a latent of 2 * grid (16 channels: 4 latent channels x 2x2), with their positions."""
    H, W = grid
    rows, cols = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1)  # (0, row, column) of each token
    return dict(hidden_states=torch.randn(batch, H * W, 16), encoder_hidden_states=torch.randn(batch, text_len, 32),
                pooled_projections=torch.randn(batch, 16), timestep=torch.full((batch,), 0.5),
                img_ids=img_ids.reshape(-1, 3).float(), txt_ids=torch.zeros(text_len, 3), return_dict=False)


def tiny_hunyuan15(heads=2, head_dim=16, layers=1):
    """HunyuanVideo 1.5 (patch 1): its self-attention mask is the outer product of one padding vector."""
    from diffusers import HunyuanVideo15Transformer3DModel

    return HunyuanVideo15Transformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=heads, attention_head_dim=head_dim, num_layers=layers,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8,
        image_embed_dim=8, rope_axes_dim=(head_dim - 12, 6, 6)).eval()


def hunyuan15_inputs(latent=(2, 8, 16), batch=2, valid=((4, 2), (6, 3))):
    """Text-to-video inputs: prompt b has valid[b] = (real Qwen tokens of 6, real ByT5 tokens of 4)."""
    mask, mask_2 = torch.zeros(batch, 6, dtype=torch.long), torch.zeros(batch, 4, dtype=torch.long)
    for b in range(batch):
        mask[b, : valid[b][0]], mask_2[b, : valid[b][1]] = 1, 1
    return dict(hidden_states=torch.randn(batch, 4, *latent), timestep=torch.full((batch,), 500.0),
                encoder_hidden_states=torch.randn(batch, 6, 16), encoder_attention_mask=mask,
                encoder_hidden_states_2=torch.randn(batch, 4, 8), encoder_attention_mask_2=mask_2,
                image_embeds=torch.zeros(batch, 3, 8), return_dict=False)


class ToyAttention(nn.Module):
    """Explicit softmax attention, as older DiT code writes it."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        return self.out((attn @ v).transpose(1, 2).reshape(B, L, C))


class ToyDiT(nn.Module):
    """Patchify with a Conv3d, text tokens at the START (CogVideoX style), explicit attention."""

    def __init__(self, channels=4, dim=32, heads=2, layers=2, text_dim=12):
        super().__init__()
        self.patch = nn.Conv3d(channels, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.text_proj = nn.Linear(text_dim, dim)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.blocks = nn.ModuleList(ToyAttention(dim, heads) for _ in range(layers))
        self.head = nn.Linear(dim, channels * 4)

    def forward(self, latent, text):
        B, C, T, H, W = latent.shape
        x = self.patch(latent).flatten(2).transpose(1, 2)
        h = torch.cat([self.text_proj(text), x], dim=1)
        for norm, blk in zip(self.norms, self.blocks):
            h = h + blk(norm(h))
        video = F.gelu(self.head(h[:, text.shape[1]:]))
        return video.view(B, T, H // 2, W // 2, C, 2, 2).permute(0, 4, 1, 2, 5, 3, 6).reshape(B, C, T, H, W)


def toy_inputs(batch=2, latent=(2, 8, 16), text_len=7):
    """(latent, text) for ToyDiT."""
    return torch.randn(batch, 4, *latent), torch.randn(batch, text_len, 12)


class SdpaBlock(nn.Module):
    """Pre-norm SDPA self-attention, residual; ``mask``: SDPA's attn_mask."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.norm = heads, nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, h, mask=None):
        B, L, C = h.shape
        q, k, v = self.qkv(self.norm(h)).view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return h + self.out(out.transpose(1, 2).reshape(B, L, C))


def outer_product_mask(m, style):
    """A [B, 1, L, L] self-attention mask from the padding vector m [B, L] (bool), spelled as models do."""
    B, L = m.shape
    if style == "repeat":  # HunyuanVideo 1.5's own code
        m1 = m.view(B, 1, 1, L).repeat(1, 1, L, 1)
        return (m1 & m1.transpose(2, 3)).bool()
    if style == "index":
        return m[:, None, :, None] & m[:, None, None, :]
    if style == "logical_and":
        return torch.logical_and(m.unsqueeze(1).unsqueeze(-1), m.reshape(B, 1, 1, L).expand(B, 1, L, L))
    if style == "two_vectors":  # a query mask and another key mask: no outer product of one vector
        return m[:, None, :, None] & m.roll(1, dims=1)[:, None, None, :]
    raise ValueError(style)


class PaddedTextDiT(nn.Module):
    """HunyuanVideo 1.5 style: video tokens, then text tokens, in one self-attention whose mask is the outer
    product of one padding vector (``outer_product_mask``): padded text tokens are hidden as keys *and* as
    queries, so their rows attend to nothing. Returns every token's output [B, L, dim], padded rows included.
    ``style="input"`` takes the [B, 1, L, L] mask as an input instead (nothing in the graph proves its form).
    """

    def __init__(self, style="repeat", channels=4, dim=32, heads=2, layers=2, text_dim=12):
        super().__init__()
        self.style = style
        self.patch = nn.Conv3d(channels, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.text_proj = nn.Linear(text_dim, dim)
        self.blocks = nn.ModuleList(SdpaBlock(dim, heads) for _ in range(layers))

    def forward(self, latent, text, text_mask):
        x = self.patch(latent).flatten(2).transpose(1, 2)
        h = torch.cat([x, self.text_proj(text)], dim=1)
        if self.style == "input":
            mask = text_mask
        else:
            m = F.pad(text_mask.bool(), (x.shape[1], 0), value=True)  # video tokens are never padding
            mask = outer_product_mask(m, self.style)
        for blk in self.blocks:
            h = blk(h, mask)
        return h

    @staticmethod
    def inputs(batch=2, latent=(2, 8, 16), text_len=8, valid=(5, 8), style="repeat"):
        """(latent, text, text_mask): sample b has ``valid[b]`` real text tokens, the rest padding."""
        text_mask = torch.zeros(batch, text_len, dtype=torch.long)
        for b in range(batch):
            text_mask[b, : valid[b % len(valid)]] = 1
        if style == "input":
            n = latent[0] * (latent[1] // 2) * (latent[2] // 2)
            m = F.pad(text_mask.bool(), (n, 0), value=True)
            text_mask = m[:, None, :, None] & m[:, None, None, :]
        return torch.randn(batch, 4, *latent), torch.randn(batch, text_len, 12), text_mask


class PackedPatchDiT(nn.Module):
    """A video DiT whose patch embedding is an nn.Linear over packed patches (no convolution in the graph),
    with a diffusers-style ``config`` giving the patch size; text tokens at the start.

    ``flat=False``: the Linear gets [B, T', H', W', pt*ph*pw*C] (Cosmos, Kandinsky 5), ``config`` a mapping
    with ``patch_size=(pt, ph, pw)``. ``flat=True``: tokens are flattened before the Linear (CogVideoX 1.5),
    ``config`` an object with ``patch_size=ph`` and ``patch_size_t=pt``.
    """

    _repeated_blocks = ["SdpaBlock"]

    def __init__(self, patch=(2, 2, 2), flat=True, channels=4, dim=32, heads=2, layers=2, text_dim=12):
        super().__init__()
        self.patch, self.flat = patch, flat
        self.config = (SimpleNamespace(patch_size=patch[1], patch_size_t=patch[0], in_channels=channels) if flat
                       else {"patch_size": tuple(patch), "in_channels": channels})
        self.embed = nn.Linear(channels * patch[0] * patch[1] * patch[2], dim)
        self.text_proj = nn.Linear(text_dim, dim)
        self.blocks = nn.ModuleList(SdpaBlock(dim, heads) for _ in range(layers))
        self.head = nn.Linear(dim, channels * patch[0] * patch[1] * patch[2])

    def forward(self, latent, text):
        B, C, T, H, W = latent.shape
        (pt, ph, pw), grid = self.patch, (T // self.patch[0], H // self.patch[1], W // self.patch[2])
        packed = latent.reshape(B, C, grid[0], pt, grid[1], ph, grid[2], pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
        x = self.embed(packed.flatten(1, 3).flatten(2)) if self.flat else self.embed(packed.flatten(4)).flatten(1, 3)
        h = torch.cat([self.text_proj(text), x], dim=1)
        for blk in self.blocks:
            h = blk(h)
        video = self.head(h[:, text.shape[1]:]).view(B, *grid, C, pt, ph, pw)
        return video.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(B, C, T, H, W)


@torch.compiler.disable
def _interruption_point(module):
    """Runs outside the compiled graph: a failure here happens at run time, as a Ctrl-C in a step does
    (an exception raised while Dynamo traces would make it give up compiling the function for good)."""
    if module.fail_with is not None:
        raise module.fail_with("interrupted")


class TinyAttention(nn.Module):
    """One SDPA self-attention over 2x8x8 = 128 tokens (optimize it with TINY_ATTENTION_OPTIONS): the
    cheapest model the pass rewrites. ``fail_with``: an exception class its forward raises after the
    attention (an interrupted pipeline)."""

    LATENT = (2, 8, 8)

    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.fail_with = None

    def forward(self, x):
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, C)
        _interruption_point(self)
        return out

    @staticmethod
    def inputs(batch=1, dim=32):
        T, H, W = TinyAttention.LATENT
        return torch.randn(batch, T * H * W, dim)


TINY_ATTENTION_OPTIONS = dict(latent_shape=TinyAttention.LATENT, tile=(4, 4), min_tokens=0, compiler="eager")


def tiny_framepack(heads=2, head_dim=16, layers=1, single_layers=1):
    """HunyuanVideo FramePack: history latents (clean, 2x, 4x) concatenated before the video tokens."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    return HunyuanVideoFramepackTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=heads, attention_head_dim=head_dim, num_layers=layers,
        num_single_layers=single_layers, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(head_dim - 12, 6, 6), image_condition_type=None,
        has_image_proj=True, image_proj_dim=8, has_clean_x_embedder=True).eval()


def framepack_inputs(latent=(2, 16, 32), batch=2, text_len=8, valid=(5, 8), image_tokens=3):
    """Inputs of a FramePack section: 1 clean frame, 2 frames at 2x and 4 at 4x downsampling as history
    (diffusers 0.42.1's FramePack needs the clean latents: without them its forward fails)."""
    inputs = hunyuan_inputs(latent, batch, text_len, valid)
    T, H, W = latent
    frames = lambda n, start: torch.arange(start, start + n)  # noqa: E731  (one index list for the batch)
    inputs.update(image_embeds=torch.randn(batch, image_tokens, 8), indices_latents=frames(T, 7))
    inputs.update(latents_clean=torch.randn(batch, 4, 1, H, W), indices_latents_clean=frames(1, 0),
                  latents_history_2x=torch.randn(batch, 4, 2, H, W), indices_latents_history_2x=frames(2, 1),
                  latents_history_4x=torch.randn(batch, 4, 4, H, W), indices_latents_history_4x=frames(4, 3))
    return inputs
