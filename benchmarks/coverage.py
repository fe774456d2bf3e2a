"""Coverage: which attention sites of each diffusers video transformer draftopt rewrites, on the CPU.

    python benchmarks/coverage.py                           # every model below, Inductor (aot_eager on failure)
    python benchmarks/coverage.py --models Wan HunyuanVideo # by name (case-insensitive; globs: 'Wan*')
    python benchmarks/coverage.py --compiler aot_eager      # faster: no C++ compile
    python benchmarks/coverage.py --list                    # the model names

For every ``*Transformer3DModel`` class of diffusers that the script can build
(``MODELS``), a tiny random-weight config (2 heads of 16, mostly one block)
gets its natural inputs (what its pipeline passes, at a latent of about 2 x 16
x 32) and is run three ways:

- the original model, fp32, under ``torch.no_grad()``: the reference;
- ``draftopt.optimize(model, sparsity=0.0, tile=(4, 4), min_tokens=0,
  compiler=...)``: at sparsity 0 the rewrite must reproduce the reference, so
  the relative error ``||out - ref|| / ||ref||`` (over every output tensor) is
  about 1e-7 where the rewrite is right;
- ``draftopt.report``: sites seen, rewritten, skipped with the reasons (equal
  reasons counted together; "(not a candidate)": cross-attention or text-only,
  which stay dense by design), and the grid / text tokens of the rewritten sites.

The notes column says what else was seen: attention calls of the eager run
(SDPA, flex attention) that no compiled graph holds, Dynamo's graph breaks (and
frames it gave up on, which run eagerly), parameters the config zero-initialises
(redrawn at random, or the attention output would not reach the result), the
compiler's own error (the same graphs without the rewrite, ``draftopt.dense``)
where the sparsity-0 error is above 1e-6, and the fallback compiler. Where video
self-attention stayed dense because its graph shows no patch embedding ("no
geometry"), a second row ``NAME + latent_shape`` runs
``optimize(..., latent_shape=(T, H, W))`` as a user would.

Each model runs inside try/except: a failure is a row with the error. An
Inductor compile that fails, or takes longer than ``--timeout`` seconds, is
redone with aot_eager, and the row says so. Time on a 2-core CPU: about 5
minutes with ``--compiler aot_eager``; with Inductor about 20 minutes while
its caches are cold (every graph's C++ is compiled), much less on a rerun.

Rows are appended to ``benchmarks/results/coverage.jsonl``
(``_results.save_table``, with the run's date, versions, device and the
draftopt source state); ``coverage.json`` / ``.csv`` of the run go to
``--out`` (default: $OUT, else a temporary folder). ``measure(name)`` is the
per-model function (tests/benchmarks/test_coverage.py).
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import logging
import math
import os
import platform
import signal
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import draftopt

if __package__:  # imported as benchmarks.coverage (tests)
    from . import _results
else:  # python benchmarks/coverage.py
    import _results

OPTIONS = dict(sparsity=0.0, tile=(4, 4), min_tokens=0)
LATENT = (2, 16, 32)  # (T, H, W) of the latent: a 2 x 8 x 16 token grid at patch (1, 2, 2)
HISTORY_LATENT = (3, 16, 32)  # models with history latents of 2 frames beside the video: not as many tokens
HEADS, HEAD_DIM = 2, 16
DIM = HEADS * HEAD_DIM
TEXT_LEN = 8


@dataclass
class Case:
    """A built model, its call and what to say about it."""

    model: nn.Module
    inputs: dict
    latent: tuple | None = None  # (T, H, W) a user would pass as latent_shape
    notes: list = field(default_factory=list)
    # Runs before each of the two measured calls (e.g. a reference pass filling a KV cache).
    prepare: Callable | None = None


MODELS: dict[str, Callable[[], Case]] = {}


def model(name: str):
    def register(fn):
        MODELS[name] = fn
        return fn
    return register


def _randn(*shape):
    return torch.randn(*shape)


def _t(value=500.0, batch=1):
    return torch.full((batch,), float(value))


def _mask(batch, length, valid):
    """[batch, length] long: sample b has valid[b % len(valid)] real tokens, the rest padding."""
    m = torch.zeros(batch, length, dtype=torch.long)
    for b in range(batch):
        m[b, : valid[b % len(valid)]] = 1
    return m


# -- Wan family ------------------------------------------------------------------------------------
_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4,
            out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=1, rope_max_seq_len=64)


def _wan_inputs(latent=LATENT, channels=4, batch=1):
    return dict(hidden_states=_randn(batch, channels, *latent), timestep=_t(batch=batch),
                encoder_hidden_states=_randn(batch, TEXT_LEN, 32), return_dict=False)


@model("Wan")
def wan():
    from diffusers import WanTransformer3DModel

    return Case(WanTransformer3DModel(**_WAN), _wan_inputs(), LATENT)


@model("WanVACE")
def wan_vace():
    from diffusers import WanVACETransformer3DModel

    m = WanVACETransformer3DModel(**_WAN, vace_layers=[0], vace_in_channels=8)
    inputs = dict(_wan_inputs(), control_hidden_states=_randn(1, 8, *LATENT))
    return Case(m, inputs, LATENT)


@model("WanAnimate")
def wan_animate():
    """Wan2.2-Animate: latent T + 1 frames (reference frame first), pose latents T frames, a face video whose
    motion encoder output is 4x shorter (5 face frames -> 2 motion frames, + 1 for the reference)."""
    from diffusers import WanAnimateTransformer3DModel

    cfg = {k: v for k, v in _WAN.items() if k not in ("in_channels", "out_channels")}
    m = WanAnimateTransformer3DModel(
        **cfg, in_channels=12, latent_channels=4, out_channels=4, image_dim=16,
        motion_encoder_channel_sizes={"8": 8, "4": 8}, motion_encoder_size=8, motion_style_dim=8, motion_dim=4,
        motion_encoder_dim=8, face_encoder_hidden_dim=8, face_encoder_num_heads=2, inject_face_latents_blocks=1,
        motion_encoder_batch_size=8)
    T = 3
    inputs = dict(hidden_states=_randn(1, 12, T, 16, 32), timestep=_t(), encoder_hidden_states=_randn(1, TEXT_LEN, 32),
                  encoder_hidden_states_image=_randn(1, 4, 16), pose_hidden_states=_randn(1, 4, T - 1, 16, 32),
                  face_pixel_values=_randn(1, 3, 5, 8, 8), return_dict=False)
    return Case(m, inputs, (T, 16, 32))


def _wan_animate2(mode: str) -> Case:
    """Wan-Animate-2: a reference pass (kv_cache_mode="extract") fills a KV cache; each denoising step
    (kv_cache_mode="cached") attends over [generation | reference] tokens through a flex BlockMask."""
    from diffusers import WanAnimate2Transformer3DModel
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache

    m = WanAnimate2Transformer3DModel(patch_size=(1, 2, 2), text_len=TEXT_LEN, in_dim=8, dim=DIM, ffn_dim=64,
                                      freq_dim=32, text_dim=32, out_dim=4, num_heads=HEADS, num_layers=1,
                                      use_img_emb=False)
    # The block mask is built over origin_len // 4 + 1 latent frames of origin_area // 256 tokens: a 5-frame,
    # 128 x 256 video gives 2 frames of 8 x 16 = 128 tokens (the generation grid).
    T, H, W = LATENT
    seq_len = T * (H // 2) * (W // 2)
    grid = torch.tensor([[T, H // 2, W // 2]])
    cache = WanAnimate2KVCache(1)
    common = dict(timestep=_t(), encoder_hidden_states=[_randn(TEXT_LEN, 32)], kv_cache=cache, seq_len=seq_len,
                  return_dict=False)
    reference = dict(common, hidden_states=[_randn(4, T, H, W)], condition_latents=[_randn(4, T, H, W)],
                     kv_cache_mode="extract", offset_grid_sizes=grid)
    if mode == "extract":
        return Case(m, reference, LATENT, prepare=cache.clear)
    generation = dict(common, hidden_states=[_randn(4, T, H, W)], condition_latents=[_randn(4, T, H, W)],
                      kv_cache_mode="cached", reference_grid_sizes=grid, origin_len=(T - 1) * 4,
                      origin_area=[H * 8, W * 8])

    def fill_cache():
        cache.clear()
        m(**reference)

    return Case(m, generation, LATENT, prepare=fill_cache)


@model("WanAnimate2-extract")
def wan_animate2_extract():
    return _wan_animate2("extract")


@model("WanAnimate2-cached")
def wan_animate2_cached():
    return _wan_animate2("cached")


@model("SkyReelsV2")
def skyreels_v2():
    from diffusers import SkyReelsV2Transformer3DModel

    return Case(SkyReelsV2Transformer3DModel(**_WAN), _wan_inputs(), LATENT)


@model("SkyReelsV2-DF")
def skyreels_v2_df():
    """Diffusion forcing with causal_block_size=2 (pipeline: transformer._set_ar_attention(2)): per-frame
    timesteps and a block-causal self-attention mask over 4 latent frames."""
    from diffusers import SkyReelsV2Transformer3DModel

    m = SkyReelsV2Transformer3DModel(**_WAN, num_frame_per_block=2)
    latent = (4, 8, 16)
    inputs = dict(_wan_inputs(latent), timestep=torch.tensor([[900.0, 900.0, 500.0, 500.0]]),
                  enable_diffusion_forcing=True)
    return Case(m, inputs, latent)


@model("ChronoEdit")
def chrono_edit():
    from diffusers import ChronoEditTransformer3DModel

    return Case(ChronoEditTransformer3DModel(**_WAN, rope_temporal_skip_len=2), _wan_inputs(), LATENT)


@model("Helios")
def helios():
    """With the pipeline's multi-term memory: short (1x), mid (2x) and long (4x) history latents, each patchified
    by its own Conv3d and concatenated before the video tokens. 3 latent frames (pipeline: 9 per chunk), so the
    chunk does not have as many tokens as the 2-frame short history."""
    from diffusers import HeliosTransformer3DModel

    cfg = {k: v for k, v in _WAN.items() if k != "rope_max_seq_len"}
    m = HeliosTransformer3DModel(**cfg, rope_dim=(4, 6, 6))
    T, H, W = latent = HISTORY_LATENT
    long_, mid, short = 4, 2, 1  # history_sizes, largest first (pipeline default [16, 2, 1])
    idx = torch.arange(1 + long_ + mid + short + T)
    prefix, i_long, i_mid, i_1x, i_video = idx.split([1, long_, mid, short, T])
    inputs = dict(_wan_inputs(latent), indices_hidden_states=i_video[None],
                  indices_latents_history_short=torch.cat([prefix, i_1x])[None],
                  indices_latents_history_mid=i_mid[None], indices_latents_history_long=i_long[None],
                  latents_history_short=_randn(1, 4, 1 + short, H, W), latents_history_mid=_randn(1, 4, mid, H, W),
                  latents_history_long=_randn(1, 4, long_, H, W))
    return Case(m, inputs, latent)


@model("AnyFlow")
def anyflow():
    """Bidirectional flow map: hidden_states [B, F, C, H, W], two timesteps (t, r)."""
    from diffusers import AnyFlowTransformer3DModel

    m = AnyFlowTransformer3DModel(**_WAN)
    T, H, W = LATENT
    inputs = dict(hidden_states=_randn(1, T, 4, H, W), timestep=torch.full((1, T), 800.0),
                  r_timestep=torch.full((1, T), 400.0), encoder_hidden_states=_randn(1, TEXT_LEN, 32),
                  return_dict=False)
    return Case(m, inputs, LATENT)


@model("AnyFlowFAR")
def anyflow_far():
    """Frame-autoregressive AnyFlow, one call over the whole clip (chunk_partition [1, 1]: two 1-frame chunks)."""
    from diffusers import AnyFlowFARTransformer3DModel

    m = AnyFlowFARTransformer3DModel(**_WAN, chunk_partition=(1, 1))
    T, H, W = LATENT
    inputs = dict(hidden_states=_randn(1, T, 4, H, W), timestep=torch.full((1, T), 800.0),
                  r_timestep=torch.full((1, T), 400.0), encoder_hidden_states=_randn(1, TEXT_LEN, 32),
                  chunk_partition=[1, 1], return_dict=False)
    return Case(m, inputs, LATENT)


# -- HunyuanVideo family ---------------------------------------------------------------------------
_HY = dict(in_channels=4, out_channels=4, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, num_layers=1,
           num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
           qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8, rope_theta=256.0,
           rope_axes_dim=(4, 6, 6))


def _hy_inputs(batch=2, latent=LATENT):
    return dict(hidden_states=_randn(batch, 4, *latent), timestep=_t(batch=batch),
                encoder_hidden_states=_randn(batch, TEXT_LEN, 16),
                encoder_attention_mask=_mask(batch, TEXT_LEN, (5, 8)),
                pooled_projections=_randn(batch, 8), guidance=_t(6000.0, batch), return_dict=False)


@model("HunyuanVideo")
def hunyuan_video():
    """HunyuanVideo 1.0, batch 2 with a short prompt (text padding: a key padding mask)."""
    from diffusers import HunyuanVideoTransformer3DModel

    return Case(HunyuanVideoTransformer3DModel(**_HY), _hy_inputs(), LATENT)


@model("HunyuanVideo15")
def hunyuan_video15():
    """HunyuanVideo 1.5 (patch 1), text-to-video: two prompts of Qwen + ByT5 tokens, padded."""
    from diffusers import HunyuanVideo15Transformer3DModel

    m = HunyuanVideo15Transformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, num_layers=1,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8,
        image_embed_dim=8, rope_axes_dim=(4, 6, 6))
    latent, B = (2, 8, 16), 2
    inputs = dict(hidden_states=_randn(B, 4, *latent), timestep=_t(batch=B), encoder_hidden_states=_randn(B, 6, 16),
                  encoder_attention_mask=_mask(B, 6, (4, 6)), encoder_hidden_states_2=_randn(B, 4, 8),
                  encoder_attention_mask_2=_mask(B, 4, (2, 3)), image_embeds=torch.zeros(B, 3, 8), return_dict=False)
    return Case(m, inputs, latent)


@model("HunyuanVideoFramepack")
def hunyuan_framepack():
    """FramePack: batch 1 (as its pipeline), clean latents (1x) and 2x / 4x history latents, each patchified
    by clean_x_embedder and concatenated before the video tokens; an image embedding joins the text. 3 latent
    frames (pipeline: latent_window_size 9), so the window does not have as many tokens as the 2 clean frames."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    m = HunyuanVideoFramepackTransformer3DModel(**_HY, image_condition_type=None, has_image_proj=True,
                                                image_proj_dim=8, has_clean_x_embedder=True)
    T, H, W = latent = HISTORY_LATENT
    idx = torch.arange(1 + 4 + 2 + 1 + T)
    i_pre, i_4x, i_2x, i_1x, i_video = idx.split([1, 4, 2, 1, T])
    inputs = dict(hidden_states=_randn(1, 4, T, H, W), timestep=_t(), encoder_hidden_states=_randn(1, TEXT_LEN, 16),
                  encoder_attention_mask=_mask(1, TEXT_LEN, (5,)), pooled_projections=_randn(1, 8),
                  image_embeds=_randn(1, 4, 8), indices_latents=i_video, guidance=_t(6000.0),
                  latents_clean=_randn(1, 4, 2, H, W), indices_latents_clean=torch.cat([i_pre, i_1x]),
                  latents_history_2x=_randn(1, 4, 2, H, W), indices_latents_history_2x=i_2x,
                  latents_history_4x=_randn(1, 4, 4, H, W), indices_latents_history_4x=i_4x, return_dict=False)
    return Case(m, inputs, latent)


@model("MotifVideo")
def motif_video():
    """Motif-Video, text-to-video (image latents zero): text after video in one joint attention, padded prompt."""
    from diffusers import MotifVideoTransformer3DModel

    m = MotifVideoTransformer3DModel(in_channels=9, out_channels=4, num_attention_heads=HEADS,
                                     attention_head_dim=HEAD_DIM, num_layers=1, num_single_layers=1, mlp_ratio=2.0,
                                     patch_size=2, patch_size_t=1, text_embed_dim=16, rope_axes_dim=(4, 6, 6))
    B = 2
    inputs = dict(hidden_states=_randn(B, 9, *LATENT), timestep=_t(batch=B),
                  encoder_hidden_states=_randn(B, TEXT_LEN, 16),
                  encoder_attention_mask=_mask(B, TEXT_LEN, (5, 8)), return_dict=False)
    return Case(m, inputs, LATENT)


# -- CogVideoX family ------------------------------------------------------------------------------
_COG = dict(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=4, time_embed_dim=32,
            text_embed_dim=16, num_layers=1, sample_width=32, sample_height=16, sample_frames=5, patch_size=2,
            temporal_compression_ratio=4, max_text_seq_length=TEXT_LEN)


def _cog_rope(m, latent):
    """The pipeline's rotary embedding (CogVideoXPipeline._prepare_rotary_positional_embeddings)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    c = m.config
    T, H, W = latent
    gh, gw = H // c.patch_size, W // c.patch_size
    base_w, base_h = c.sample_width // c.patch_size, c.sample_height // c.patch_size
    if getattr(c, "patch_size_t", None) is None:
        crops = get_resize_crop_region_for_grid((gh, gw), base_w, base_h)
        return get_3d_rotary_pos_embed(c.attention_head_dim, crops, (gh, gw), T)
    return get_3d_rotary_pos_embed(c.attention_head_dim, None, (gh, gw), (T + c.patch_size_t - 1) // c.patch_size_t,
                                   grid_type="slice", max_size=(base_h, base_w))


def _cog_inputs(m, latent, batch=1):
    T, H, W = latent
    return dict(hidden_states=_randn(batch, T, 4, H, W), encoder_hidden_states=_randn(batch, TEXT_LEN, 16),
                timestep=_t(batch=batch), image_rotary_emb=_cog_rope(m, latent), return_dict=False)


@model("CogVideoX")
def cogvideox():
    """CogVideoX 1.0 (5B style: rotary embeddings), per-frame Conv2d patch embedding, text first."""
    from diffusers import CogVideoXTransformer3DModel

    m = CogVideoXTransformer3DModel(**_COG, use_rotary_positional_embeddings=True)
    return Case(m, _cog_inputs(m, LATENT), LATENT)


@model("CogVideoX1.5")
def cogvideox15():
    """CogVideoX 1.5: patch_size_t=2, a Linear patch embedding over packed 2x2x2 patches."""
    from diffusers import CogVideoXTransformer3DModel

    m = CogVideoXTransformer3DModel(**{**_COG, "sample_frames": 9}, patch_size_t=2, ofs_embed_dim=None,
                                    use_rotary_positional_embeddings=True, use_learned_positional_embeddings=False,
                                    patch_bias=False)
    latent = (4, 16, 32)
    return Case(m, _cog_inputs(m, latent), latent)


@model("ConsisID")
def consisid():
    """ConsisID with its face branch (is_train_face): id_cond and multi-scale ViT features of the face."""
    from diffusers import ConsisIDTransformer3DModel

    cfg = dict(_COG, num_attention_heads=3)  # the face branch's kv width is 2/3 of 3 x 16
    m = ConsisIDTransformer3DModel(**cfg, use_rotary_positional_embeddings=True, is_train_face=True, is_kps=False,
                                   cross_attn_interval=1, cross_attn_dim_head=8, cross_attn_num_heads=2,
                                   LFE_id_dim=16, LFE_vit_dim=16, LFE_depth=2, LFE_dim_head=8, LFE_num_heads=2,
                                   LFE_num_id_token=2, LFE_num_querie=4, LFE_output_dim=32, LFE_ff_mult=1,
                                   LFE_num_scale=2)
    inputs = dict(_cog_inputs(m, LATENT), id_cond=_randn(1, 16), id_vit_hidden=[_randn(1, 5, 16) for _ in range(2)])
    return Case(m, inputs, LATENT)


# -- LTX ---------------------------------------------------------------------------------------------
@model("LTXVideo")
def ltx_video():
    """LTX-Video: packed tokens [B, T*H*W, C] (patch 1), text as cross-attention with a padding mask."""
    from diffusers import LTXVideoTransformer3DModel

    m = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                   num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, cross_attention_dim=DIM,
                                   num_layers=1, caption_channels=16)
    T, H, W = latent = (2, 8, 16)
    inputs = dict(hidden_states=_randn(1, T * H * W, 8), encoder_hidden_states=_randn(1, TEXT_LEN, 16), timestep=_t(),
                  encoder_attention_mask=_mask(1, TEXT_LEN, (5,)), num_frames=T, height=H, width=W,
                  rope_interpolation_scale=(20 / 25, 32, 32), return_dict=False)
    return Case(m, inputs, latent)


def _ltx2_dims() -> dict:
    """LTX-2's tiny dimensions (its SANA-WM refiner is built the same way)."""
    return dict(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=HEADS,
                attention_head_dim=HEAD_DIM, cross_attention_dim=DIM, audio_in_channels=8, audio_out_channels=8,
                audio_num_attention_heads=HEADS, audio_attention_head_dim=HEAD_DIM, audio_cross_attention_dim=DIM,
                num_layers=1, caption_channels=16)


@model("LTX2Video")
def ltx2_video():
    """LTX-2: packed video tokens and audio tokens, video / audio self-attention, text and a2v / v2a cross-attention."""
    from diffusers import LTX2VideoTransformer3DModel

    m = LTX2VideoTransformer3DModel(**_ltx2_dims())
    T, H, W = latent = (2, 8, 16)
    A = 6  # audio latent frames
    inputs = dict(hidden_states=_randn(1, T * H * W, 8), audio_hidden_states=_randn(1, A, 8),
                  encoder_hidden_states=_randn(1, TEXT_LEN, 16), audio_encoder_hidden_states=_randn(1, TEXT_LEN, 16),
                  timestep=_t(), sigma=torch.tensor([0.5]), encoder_attention_mask=_mask(1, TEXT_LEN, (5,)),
                  audio_encoder_attention_mask=_mask(1, TEXT_LEN, (5,)), num_frames=T, height=H, width=W, fps=24.0,
                  audio_num_frames=A, return_dict=False)
    return Case(m, inputs, latent)


# -- others --------------------------------------------------------------------------------------------
@model("Mochi")
def mochi():
    """Mochi 1: joint attention over video + the *valid* text tokens of each sample (a per-sample loop)."""
    from diffusers import MochiTransformer3DModel

    m = MochiTransformer3DModel(patch_size=2, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, num_layers=1,
                                pooled_projection_dim=16, in_channels=4, text_embed_dim=16, time_embed_dim=16,
                                max_sequence_length=TEXT_LEN)
    B = 2
    inputs = dict(hidden_states=_randn(B, 4, *LATENT), encoder_hidden_states=_randn(B, TEXT_LEN, 16),
                  timestep=_t(batch=B), encoder_attention_mask=_mask(B, TEXT_LEN, (5, 8)), return_dict=False)
    return Case(m, inputs, LATENT)


@model("Allegro")
def allegro():
    """Allegro: per-frame Conv2d patch embedding, the pipeline's 3-D rotary positions, text as cross-attention."""
    from diffusers import AllegroTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed_allegro

    head_dim = 24  # a third of it per axis, even
    m = AllegroTransformer3DModel(patch_size=2, patch_size_t=1, num_attention_heads=HEADS, attention_head_dim=head_dim,
                                  in_channels=4, out_channels=4, num_layers=1, cross_attention_dim=HEADS * head_dim,
                                  sample_height=16, sample_width=32, sample_frames=2, caption_channels=16)
    T, H, W = LATENT
    gh, gw = H // 2, W // 2
    c = m.config
    freqs_t, freqs_h, freqs_w, gt, ghh, gww = get_3d_rotary_pos_embed_allegro(
        head_dim, ((0, 0), (gh, gw)), (gh, gw), T,
        (c.interpolation_scale_t, c.interpolation_scale_h, c.interpolation_scale_w))
    pos = torch.cartesian_prod(gt.long(), ghh.long(), gww.long()).reshape(-1, 3).transpose(0, 1).reshape(3, 1, -1)
    inputs = dict(hidden_states=_randn(1, 4, *LATENT), encoder_hidden_states=_randn(1, TEXT_LEN, 16), timestep=_t(),
                  encoder_attention_mask=_mask(1, TEXT_LEN, (5,)),
                  image_rotary_emb=((freqs_t, freqs_h, freqs_w), tuple(pos.contiguous())), return_dict=False)
    return Case(m, inputs, LATENT)


@model("EasyAnimate")
def easyanimate():
    """EasyAnimate V5.1: per-frame Conv2d patch embedding, text first in one joint attention (MMDiT blocks)."""
    from diffusers import EasyAnimateTransformer3DModel

    m = EasyAnimateTransformer3DModel(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4,
                                      out_channels=4, patch_size=2, sample_width=32, sample_height=16, num_layers=1,
                                      mmdit_layers=1, time_embed_dim=16, text_embed_dim=16, add_norm_text_encoder=False,
                                      time_position_encoding_type="3d_rope", after_norm=False,
                                      resize_inpaint_mask_directly=True, enable_text_attention_mask=True)
    inputs = dict(hidden_states=_randn(1, 4, *LATENT), timestep=_t(), encoder_hidden_states=_randn(1, TEXT_LEN, 16),
                  return_dict=False)
    return Case(m, inputs, LATENT)


@model("Cosmos")
def cosmos():
    """Cosmos Predict (text-to-world): Linear patch embedding over packed patches [B, T, H, W, K]."""
    from diffusers import CosmosTransformer3DModel

    m = CosmosTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
                                 num_layers=1, mlp_ratio=2.0, text_embed_dim=16, adaln_lora_dim=8,
                                 max_size=(8, 32, 32), patch_size=(1, 2, 2), rope_scale=(1.0, 1.0, 1.0),
                                 concat_padding_mask=False, extra_pos_embed_type="learnable")
    inputs = dict(hidden_states=_randn(1, 4, *LATENT), timestep=_t(0.5), encoder_hidden_states=_randn(1, TEXT_LEN, 16),
                  fps=24, return_dict=False)
    return Case(m, inputs, LATENT, notes=["concat_padding_mask=False (needs torchvision, not installed)"])


@model("Kandinsky5")
def kandinsky5():
    """Kandinsky 5 Video Lite: channels-last latent [B, T, H, W, C], Linear patch embedding, text as cross-attention."""
    from diffusers import Kandinsky5Transformer3DModel

    m = Kandinsky5Transformer3DModel(in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, out_visual_dim=4,
                                     patch_size=(1, 2, 2), model_dim=DIM, ff_dim=64, num_text_blocks=1,
                                     num_visual_blocks=1, axes_dims=(4, 6, 6), visual_cond=False)
    T, H, W = LATENT
    inputs = dict(hidden_states=_randn(1, T, H, W, 4), encoder_hidden_states=_randn(1, TEXT_LEN, 16), timestep=_t(),
                  pooled_projections=_randn(1, 8),
                  visual_rope_pos=[torch.arange(T), torch.arange(H // 2), torch.arange(W // 2)],
                  text_rope_pos=torch.arange(TEXT_LEN), scale_factor=(1.0, 1.0, 1.0), return_dict=False)
    return Case(m, inputs, LATENT)


@model("Latte")
def latte():
    """Latte: spatial attention per frame and temporal attention per token position, alternating."""
    from diffusers import LatteTransformer3DModel

    m = LatteTransformer3DModel(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=8,
                                num_layers=1, cross_attention_dim=DIM, sample_size=16, patch_size=2,
                                activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                                norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=16, video_length=2)
    inputs = dict(hidden_states=_randn(1, 4, 2, 16, 16), timestep=_t(), encoder_hidden_states=_randn(1, TEXT_LEN, 16),
                  enable_temporal_attentions=True, return_dict=False)  # the pipeline passes no text mask
    return Case(m, inputs, (2, 16, 16))


@model("SanaVideo")
def sana_video():
    """SANA-Video: linear attention (ReLU kernels) for self-attention, softmax cross-attention to text."""
    from diffusers import SanaVideoTransformer3DModel

    m = SanaVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=HEADS,
                                    attention_head_dim=HEAD_DIM, num_layers=1, num_cross_attention_heads=HEADS,
                                    cross_attention_head_dim=HEAD_DIM, cross_attention_dim=DIM, caption_channels=16,
                                    mlp_ratio=2.0, sample_size=16, patch_size=(1, 2, 2), rope_max_seq_len=64)
    inputs = dict(hidden_states=_randn(1, 4, *LATENT), encoder_hidden_states=_randn(1, TEXT_LEN, 16), timestep=_t(),
                  encoder_attention_mask=_mask(1, TEXT_LEN, (5,)), return_dict=False)
    return Case(m, inputs, LATENT)


@model("MiniMaxH3")
def minimax_h3():
    """MiniMax-H3 text-to-video+audio: one packed sequence [text | audio | video] built by index_copy (the modular
    pipeline's layout), full self-attention over it, no cross-attention."""
    from diffusers import MiniMaxH3Transformer3DModel
    from diffusers.modular_pipelines.minimax_h3 import before_denoise as bd

    m = MiniMaxH3Transformer3DModel(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, hidden_size=DIM,
                                    num_layers=1, num_refiner_layers=1, ffn_dim=64, in_channels=4,
                                    audio_in_channels=4, patch_size=(1, 2, 2), text_dim=16, freq_dim=16,
                                    time_embed_hidden_dim=DIM, time_embed_dim=16, rope_freq_dim=2)
    T, H, W = LATENT
    video_rows = T * (H // 2) * (W // 2)
    audio_latents, audio_channels = 4, 2
    audio_rows = audio_latents * audio_channels
    L = TEXT_LEN + audio_rows + video_rows
    text_idx, audio_idx = torch.arange(TEXT_LEN), torch.arange(TEXT_LEN, TEXT_LEN + audio_rows)
    video_idx = torch.arange(TEXT_LEN + audio_rows, L)
    frame_grid, _ = bd._frame_position_grid(H, W, 2, 2)
    pos = torch.zeros(L, 3, dtype=torch.float64)
    pos[:TEXT_LEN, 0] = torch.arange(TEXT_LEN, dtype=torch.float64)
    pos[TEXT_LEN:TEXT_LEN + audio_rows, 0] = (TEXT_LEN + torch.arange(audio_latents, dtype=torch.float64)).repeat(
        audio_channels)
    video_pos = torch.empty(T, (H // 2) * (W // 2), 3, dtype=torch.float64)
    video_pos[:, :, 0] = bd._temporal_position_grid(T, float(TEXT_LEN))[:, None]
    video_pos[:, :, 1:] = frame_grid[None]
    pos[TEXT_LEN + audio_rows:] = video_pos.reshape(-1, 3)
    tags = torch.zeros(L, dtype=torch.long)
    tags[audio_idx], tags[video_idx] = 1, 2
    inputs = dict(hidden_states=_randn(1, video_rows, 4 * 4), audio_hidden_states=_randn(1, audio_rows, 4),
                  encoder_hidden_states=_randn(1, TEXT_LEN, 16), timestep=torch.tensor([0.5, 0.0]),
                  timestep_indices=torch.zeros(L, dtype=torch.long), token_tags=tags, position_ids=pos.float(),
                  video_indices=video_idx, audio_indices=audio_idx, text_indices=text_idx, return_dict=False)
    return Case(m, inputs, LATENT)


@model("Kandinsky6")
def kandinsky6():
    """Kandinsky 6 (video + audio): channels-last latent with visual conditioning channels, Linear patch embedding,
    audio tokens beside the video in each visual block."""
    from diffusers import Kandinsky6Transformer3DModel

    m = Kandinsky6Transformer3DModel(in_visual_dim=4, out_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16,
                                     patch_size=(1, 2, 2), model_dim=DIM, ff_dim=64, num_text_blocks=1,
                                     num_visual_blocks=1, axes_dims=(4, 6, 6), visual_cond=True, in_audio_dim=4,
                                     out_audio_dim=4, model_dim_a=DIM, time_dim_a=16, ff_dim_a=64, axes_dims_a=(16,))
    T, H, W = LATENT
    inputs = dict(hidden_states=_randn(1, T, H, W, 2 * 4 + 1), encoder_hidden_states=_randn(1, TEXT_LEN, 16),
                  pooled_projections=_randn(1, 8), timestep=_t(), audio_hidden_states=_randn(1, 6, 4),
                  encoder_attention_mask=_mask(1, TEXT_LEN, (8,)).bool(), return_dict=False)
    return Case(m, inputs, LATENT)


@model("Kandinsky6SR")
def kandinsky6_sr():
    """Kandinsky 6 super-resolution: NABLA sparse attention (flex attention, its own block mask) over tokens
    reordered into 8 x 8 fractal blocks; patch 1."""
    from diffusers import Kandinsky6SRTransformer3DModel

    m = Kandinsky6SRTransformer3DModel(in_visual_dim=4, out_visual_dim=4, time_dim=16, patch_size=(1, 1, 1),
                                       model_dim=DIM, ff_dim=64, num_visual_blocks=1, axes_dims=(4, 6, 6),
                                       nabla_window=(3, 3, 3))
    T, H, W = LATENT
    # channels: noisy latent, the upsampled low-resolution condition, a mask (2 * 4 + 1)
    inputs = dict(hidden_states=_randn(1, T, H, W, 9), timestep=_t(), return_dict=False)
    return Case(m, inputs, LATENT)


@model("JoyImageEdit")
def joyimage_edit():
    """JoyImage-Edit (image editing, a 3-D model): a reference image and the target as two items, i.e. two frames
    of one Conv3d-patchified sequence, text after them in joint attention."""
    from diffusers import JoyImageEditTransformer3DModel

    m = JoyImageEditTransformer3DModel(patch_size=[1, 2, 2], in_channels=4, out_channels=4, hidden_size=DIM,
                                       num_attention_heads=HEADS, text_dim=16, mlp_width_ratio=2.0, num_layers=1,
                                       rope_dim_list=[4, 6, 6])
    inputs = dict(hidden_states=_randn(1, 2, 4, 1, 16, 32), timestep=_t(),
                  encoder_hidden_states=_randn(1, TEXT_LEN, 16),
                  return_dict=False)
    return Case(m, inputs, LATENT)


@model("JoyImageEditPlus")
def joyimage_edit_plus():
    """JoyImage-Edit-Plus: pre-patchified input [B, N, C, pt, ph, pw] (N patches of every item, padded), one
    Conv3d per patch, a shape_list of the items' grids, a padding mask over patches and text."""
    from diffusers import JoyImageEditPlusTransformer3DModel

    m = JoyImageEditPlusTransformer3DModel(patch_size=[1, 2, 2], in_channels=4, out_channels=4, hidden_size=DIM,
                                           num_attention_heads=HEADS, text_dim=16, mlp_width_ratio=2.0, num_layers=1,
                                           rope_dim_list=[4, 6, 6])
    T, H, W = LATENT
    n = T * (H // 2) * (W // 2)
    inputs = dict(hidden_states=_randn(1, n, 4, 1, 2, 2), timestep=_t(), encoder_hidden_states=_randn(1, TEXT_LEN, 16),
                  encoder_hidden_states_mask=_mask(1, TEXT_LEN, (5,)).float(),
                  shape_list=[[(1, H // 2, W // 2), (1, H // 2, W // 2)]], return_dict=False)
    return Case(m, inputs, LATENT)


@model("SanaWM")
def sana_wm():
    """SANA-WM (camera-controlled world model), 4 blocks: gated-delta-net linear attention, softmax attention in
    every 4th block (softmax_every_n=4); text as cross-attention. No camera input (text-to-video)."""
    from diffusers import SanaWMTransformer3DModel

    m = SanaWMTransformer3DModel(in_channels=4, num_layers=4, hidden_size=DIM, num_attention_heads=HEADS,
                                 patch_size=(1, 2, 2), softmax_every_n=4, linear_head_dim=HEAD_DIM, caption_channels=16,
                                 chunk_plucker_channels=8, chunk_plucker_post_attn_blocks=4, image_size=128,
                                 mlp_ratio=2.0, mixed_precision="fp32")
    T = LATENT[0]
    inputs = dict(hidden_states=_randn(1, 4, *LATENT), timestep=torch.full((1, 1, T), 500.0),
                  encoder_hidden_states=_randn(1, 1, TEXT_LEN, 16), encoder_attention_mask=_mask(1, TEXT_LEN, (5,)),
                  return_dict=False)
    return Case(m, inputs, LATENT)


@model("SanaWMLTX2Refiner")
def sana_wm_refiner():
    """SANA-WM's LTX-2 refiner, one denoising step of its sliding-window AR loop (kv_cache_mode="inject"): the
    active 2-frame block attends to [sink frame + current] K/V; packed tokens, patch 1."""
    from diffusers import SanaWMLTX2RefinerTransformer3DModel
    from diffusers.models.transformers.transformer_sana_wm_refiner import SanaWMRefinerKVCache

    m = SanaWMLTX2RefinerTransformer3DModel(**_ltx2_dims())
    T, H, W = latent = (2, 8, 16)
    text, text_mask = _randn(1, TEXT_LEN, 16), _mask(1, TEXT_LEN, (5,))
    cache = SanaWMRefinerKVCache(1)

    def rope(frames):
        return m.build_rotary_emb_for_absolute_positions(batch_size=1, frame_positions=frames, height=H, width=W,
                                                         device=torch.device("cpu"), fps=24.0)

    with torch.no_grad():  # the pipeline's sink capture: one clean frame, pre-RoPE K/V
        m(hidden_states=_randn(1, H * W, 8), encoder_hidden_states=text, timestep=torch.zeros(1, H * W),
          video_rotary_emb=rope([0]), encoder_attention_mask=text_mask, kv_cache=cache,
          kv_cache_mode="capture_pre_rope", return_dict=False)
    for i in range(1):
        layer = cache.get(i)
        layer.store_sink(*layer.get_captured_pre_rope())
    cache.sink_pe = rope([0])
    inputs = dict(hidden_states=_randn(1, T * H * W, 8), encoder_hidden_states=text,
                  timestep=torch.full((1, T * H * W), 500.0), video_rotary_emb=rope([1, 2]),
                  encoder_attention_mask=text_mask, kv_cache=cache, kv_cache_mode="inject", return_dict=False)
    return Case(m, inputs, latent)


# -- measuring -------------------------------------------------------------------------------------------
class _CountAttention(TorchFunctionMode):
    """Counts the attention calls of an eager run: SDPA and flex attention, by [Lq, Lk]."""

    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in ("scaled_dot_product_attention", "flex_attention"):
            q = args[0] if args else kwargs.get("query")
            k = args[1] if len(args) > 1 else kwargs.get("key")
            if isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and q.dim() >= 2:
                self.calls[f"{name.replace('scaled_dot_product_attention', 'sdpa')} {q.shape[-2]}x{k.shape[-2]}"] += 1
        return func(*args, **kwargs)


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    if hasattr(out, "to_tuple"):  # diffusers BaseOutput
        return _tensors(out.to_tuple())
    return []


def rel_error(out, ref) -> float:
    """||out - ref|| / ||ref|| over every output tensor (float64)."""
    a, b = _tensors(out), _tensors(ref)
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        raise ValueError(f"outputs differ in structure: {[tuple(x.shape) for x in a]} vs {[tuple(y.shape) for y in b]}")
    num = math.sqrt(sum(float((x.double() - y.double()).pow(2).sum()) for x, y in zip(a, b)))
    den = math.sqrt(sum(float(y.double().pow(2).sum()) for y in b))
    return num / den if den else float("nan")


def _redraw_zero_parameters(m: nn.Module) -> int:
    """Zero-initialised weights (output projections, gates, adaLN-zero) would keep the attention output from the
    result and make the comparison vacuous: redraw them N(0, 0.02). Returns how many tensors were redrawn."""
    n = 0
    with torch.no_grad():
        for p in m.parameters():
            if p.numel() and not p.any():
                p.normal_(0.0, 0.02)
                n += 1
    return n


def _count(strings) -> list[str]:
    return [f"{n} x {s}" if n > 1 else s for s, n in Counter(strings).items()]


def _grid_text(s) -> str:
    grid = "x".join(map(str, s.grid)) if s.grid else "?"
    if not s.text_len:
        text = "0"
    elif isinstance(s.text_position, int):  # a count before the grid, the rest after it
        text = f"{s.text_len} ({s.text_position} before the grid, {s.text_len - s.text_position} after)"
    else:
        text = f"{s.text_len}@{s.text_position}"
    mask = f", {s.mask_form}" if s.mask_form else ""
    dtype = f", {s.dtype}" if s.dtype and s.dtype != "float32" else ""
    return f"{grid}, text {text}{mask}{dtype}"


def _break_reasons() -> list[str]:
    """Dynamo's graph breaks since the counters were cleared: the reason's first line, the op or value it names
    ("Developer debug context"), and whether Dynamo then gave up on the frame (it runs eagerly: attention in it
    reaches no graph)."""
    found = Counter()
    for key in ("unimplemented", "graph_break"):
        for text, n in torch._dynamo.utils.counters.get(key, {}).items():
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            head = lines[0][:120] if lines else "?"
            context = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Developer debug context:")]
            skipped = [ln.split("frame skipped:", 1)[1].strip() for ln in lines if "frame skipped:" in ln]
            what = head + (f" ({context[0][:100]})" if context and context[0] else "")
            if skipped:
                what += f"; frame skipped, runs eagerly: {skipped[0][:140]}"
            found[what] += n
    return [f"{n} x {r}" if n > 1 else r for r, n in found.items()]


def _run(case: Case, fn, mode=None):
    if case.prepare is not None:
        case.prepare()
    with mode if mode is not None else contextlib.nullcontext():
        return fn(**case.inputs)


BASELINE_ABOVE = 1e-6  # a sparsity-0 error above this gets the compiler-only error beside it


class CompileTimeout(BaseException):
    """The compile of one model took longer than its limit (a BaseException: no ``except Exception`` inside
    Dynamo or draftopt turns it into a silent fallback)."""


@contextlib.contextmanager
def _time_limit(seconds: float | None):
    """Raise CompileTimeout in this thread after ``seconds`` (SIGALRM; no limit where there is none)."""
    if not seconds or not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum, frame):
        raise CompileTimeout(f"no result after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _optimized_call(case: Case, compiler: str, latent_shape):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    options = dict(OPTIONS, compiler=compiler)
    if latent_shape is not None:
        options["latent_shape"] = latent_shape
    opt = draftopt.optimize(case.model, **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _run(case, opt)
    return opt, out, caught


def measure(name: str, compiler: str = "inductor", fallback: str | None = "aot_eager",
            with_latent_shape: bool = False, timeout: float | None = None) -> dict:
    """One row: build MODELS[name], run it eagerly and through draftopt at sparsity 0, read the report.

    ``compiler`` failing, or not done after ``timeout`` seconds (compile and call), falls back to ``fallback``
    (None: no fallback), said in ``notes``. Never raises for the model's sake: a failure is ``error`` (and
    ``traceback``). ``with_latent_shape``: pass the case's latent as ``latent_shape``.
    """
    row = dict(model=name + (" + latent_shape" if with_latent_shape else ""), cls="", compiler=compiler, sites=None,
               rewritten=None, skipped=None, dense=None, skipped_reasons=[], dense_reasons=[], grid_text=[],
               rel_err=None, eager_attention=[], unseen_attention=None, graphs=None, graph_breaks=[], notes=[],
               latent_shape=None, rel_err_compiler_only=None, fallback_reason=None, sites_detail=[], error=None,
               traceback=None, compile_seconds=None, seconds=None)
    start = time.perf_counter()
    try:
        torch.manual_seed(0)
        case = MODELS[name]()
        case.model.eval()
        row["cls"] = type(case.model).__name__
        row["notes"] += case.notes
        redrawn = _redraw_zero_parameters(case.model)
        if redrawn:
            row["notes"].append(f"{redrawn} zero-initialised parameter tensors redrawn")
        latent_shape = case.latent if with_latent_shape else None
        row["latent_shape"] = latent_shape
        with torch.no_grad():
            counter = _CountAttention()
            ref = _run(case, case.model, counter)
            row["eager_attention"] = _count_eager(counter.calls)
            compile_start = time.perf_counter()
            try:
                with _time_limit(timeout):
                    opt, out, caught = _optimized_call(case, compiler, latent_shape)
            except (Exception, CompileTimeout) as e:  # noqa: BLE001 - the fallback compiler, said in the row
                if fallback is None or fallback == compiler:
                    raise
                what = "timed out" if isinstance(e, CompileTimeout) else "failed"
                row["fallback_reason"] = f"{compiler} {what} ({type(e).__name__}: {_first_line(e)}); ran {fallback}"
                row["notes"].append(row["fallback_reason"])
                row["compiler"] = fallback
                compile_start = time.perf_counter()
                opt, out, caught = _optimized_call(case, fallback, latent_shape)
            row["compile_seconds"] = round(time.perf_counter() - compile_start, 1)
        row["graph_breaks"] = _break_reasons()
        row["rel_err"] = rel_error(out, ref)
        rep = draftopt.report(opt)
        sites = rep.sites
        row.update(sites=len(sites), rewritten=len(rep.rewritten), skipped=len(rep.skipped), graphs=len(rep.graphs))
        dense = [s for s in rep.skipped if s.candidate]
        row["dense"] = len(dense)
        row["dense_reasons"] = _count(s.reason for s in dense)
        row["skipped_reasons"] = _count(s.reason + ("" if s.candidate else " (not a candidate)") for s in rep.skipped)
        row["grid_text"] = list(dict.fromkeys(_grid_text(s) for s in rep.rewritten))
        row["sites_detail"] = [dict(name=s.name, status=s.status, q=list(s.q_shape), kv=list(s.kv_shape),
                                    dtype=s.dtype, grid=s.grid, grid_source=s.grid_source, text_len=s.text_len,
                                    text_position=s.text_position, reason=s.reason, candidate=s.candidate)
                               for s in sites]
        seen = sum(1 for s in sites)
        eager = sum(counter.calls.values())
        row["unseen_attention"] = eager - seen
        if eager != seen:
            row["notes"].append(f"{eager} attention calls in the eager run, {seen} sites in compiled graphs")
        if row["graph_breaks"]:
            row["notes"].append(f"{row['graphs']} graphs; graph breaks: " + "; ".join(row["graph_breaks"]))
        if row["fallback_reason"] and not rep.rewritten:  # then the compiler failed on the model's own graphs
            i = row["notes"].index(row["fallback_reason"])
            row["fallback_reason"] += f" (no site rewritten: {compiler} fails on the unchanged graphs)"
            row["notes"][i] = row["fallback_reason"]
        failed = [str(w.message) for w in caught if "compiling the rewritten graph failed" in str(w.message)]
        if failed:
            row["notes"].append(failed[0][:300])
        if row["rel_err"] > BASELINE_ABOVE:  # how much of it the compiler alone gives: the same graphs, no rewrite
            # (after the report is read: the dense graphs add records of their own)
            with torch.no_grad(), draftopt.dense(opt), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                row["rel_err_compiler_only"] = rel_error(_run(case, opt), ref)
            row["notes"].append(f"{row['compiler']} without the rewrite (draftopt.dense): rel. error "
                                f"{row['rel_err_compiler_only']:.1e}")
    except (Exception, CompileTimeout) as e:  # noqa: BLE001 - one model's failure is its row
        row["error"] = f"{type(e).__name__}: {_first_line(e)}"
        row["traceback"] = traceback.format_exc(limit=-8)
    finally:
        row["seconds"] = round(time.perf_counter() - start, 1)
        torch._dynamo.reset()
    return row


def _count_eager(calls: Counter) -> list[str]:
    return [f"{n} x {k}" for k, n in calls.items()]


def _first_line(e: BaseException, n: int = 300) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else "")[:n]


# -- output ------------------------------------------------------------------------------------------------
HEADERS = ["model", "cls", "compiler", "sites", "rewritten", "skipped", "dense", "skipped_reasons", "dense_reasons",
           "grid_text", "rel_err", "eager_attention", "unseen_attention", "graphs", "graph_breaks", "notes",
           "latent_shape", "rel_err_compiler_only", "fallback_reason", "sites_detail", "error", "traceback",
           "compile_seconds", "seconds"]


def _cell(x) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def markdown(rows: list[dict]) -> str:
    """The table: model (class) | sites seen | rewritten | skipped (reason) | grid, text | sparsity-0 rel. error |
    notes."""
    lines = ["| model (class) | sites seen | rewritten | skipped (reason) | grid, text | sparsity-0 rel. error "
             "| notes |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        cls = f"{r['model']} ({r['cls']})" if r["cls"] and r["cls"] != r["model"] else r["model"]
        if r["error"]:
            notes = "; ".join([*r["notes"], f"**error**: {r['error']}"])
            lines.append(f"| {_cell(cls)} | {r['sites'] if r['sites'] is not None else '-'} | - | - | - | - | "
                         f"{_cell(notes)} |")
            continue
        skipped = "<br>".join(_cell(s) for s in r["skipped_reasons"]) or "0"
        skipped = f"{r['skipped']}: {skipped}" if r["skipped"] else "0"
        err = f"{r['rel_err']:.1e}" + ("" if r["rewritten"] else " (nothing rewritten)")
        notes = "; ".join([f"compiler {r['compiler']}", *r["notes"]])
        lines.append(f"| {_cell(cls)} | {r['sites']} | {r['rewritten']} | {skipped} | "
                     f"{'<br>'.join(_cell(g) for g in r['grid_text']) or '-'} | {err} | {_cell(notes)} |")
    return "\n".join(lines)


def source_state() -> str | None:
    """The draftopt source the run used: git HEAD, and a hash of the uncommitted changes under src/ if any."""
    import hashlib
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        diff = subprocess.run(["git", "diff", "HEAD", "--", "src"], cwd=root, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + (f" + uncommitted src changes (sha1 {hashlib.sha1(diff).hexdigest()[:12]})" if diff else "")


def select(patterns) -> list[str]:
    if not patterns:
        return list(MODELS)
    chosen = []
    lower = {n.lower(): n for n in MODELS}
    for p in patterns:
        key = p.lower()
        hits = [lower[key]] if key in lower else [n for n in MODELS if fnmatch.fnmatch(n.lower(), key)]
        if not hits:
            raise SystemExit(f"--models: no model {p!r}; known: {', '.join(MODELS)}")
        chosen += [h for h in hits if h not in chosen]
    return chosen


def main(argv=None) -> list[dict]:
    from tqdm import tqdm

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=None, help="names or globs (default: all); --list shows them")
    ap.add_argument("--compiler", default="inductor", choices=["inductor", "aot_eager", "eager"])
    ap.add_argument("--no-fallback", action="store_true", help="no aot_eager rerun when the compiler fails")
    ap.add_argument("--timeout", type=float, default=240.0,
                    help="seconds for --compiler's compile + call of one model before it falls back to aot_eager "
                         "(default 240; 0: none)")
    ap.add_argument("--no-latent-shape-rows", action="store_true",
                    help="no second row with latent_shape where sites lacked geometry")
    ap.add_argument("--out", default=None, help="folder of coverage.json/.csv (default: $OUT, else a temporary one)")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(MODELS))
        return []
    names = select(args.models)
    fallback = None if args.no_fallback else "aot_eager"
    torch._logging.set_logs(dynamo=logging.ERROR)  # graph breaks are in the rows; not Dynamo's pages of them
    rows = []
    start = time.perf_counter()
    bar = tqdm(names, desc="coverage", unit="model")
    for name in bar:
        bar.set_postfix_str(name)
        timeout = args.timeout if args.compiler == "inductor" else None
        row = measure(name, args.compiler, fallback, timeout=timeout)
        rows.append(row)
        no_geometry = any("no geometry" in r for r in row["dense_reasons"])
        if no_geometry and not args.no_latent_shape_rows:
            rows.append(measure(name, args.compiler, fallback, with_latent_shape=True, timeout=timeout))
    seconds = time.perf_counter() - start
    import diffusers

    meta = dict(device=f"CPU ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)",
                diffusers=diffusers.__version__, draftopt=getattr(draftopt, "__version__", None),
                draftopt_source=source_state(),
                options={**OPTIONS, "tile": list(OPTIONS["tile"])}, compiler_requested=args.compiler,
                run_seconds=round(seconds, 1))  # not "seconds": each row has its own
    out = args.out or os.environ.get("OUT") or tempfile.mkdtemp(prefix="coverage-")
    _results.save_table("coverage", HEADERS, [[r.get(h) for h in HEADERS] for r in rows], meta, out=out)
    print()
    print(f"{meta['device']}, torch {torch.__version__}, diffusers {diffusers.__version__}; "
          f"draftopt.optimize(model, sparsity=0.0, tile=(4, 4), min_tokens=0, compiler={args.compiler!r}); "
          f"{len(rows)} rows in {seconds:.0f} s")
    print()
    print(markdown(rows))
    errors = [r for r in rows if r["error"]]
    for r in errors:
        print(f"\n{r['model']}: {r['error']}\n{r['traceback']}", file=sys.stderr)
    print(f"\nrows appended to {os.path.join(_results.RESULTS, 'coverage.jsonl')}; coverage.json/.csv in {out}")
    return rows


if __name__ == "__main__":
    main()
