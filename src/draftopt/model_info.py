"""What ``optimize`` reads off the model itself: its patch size, its repeated blocks, the latent of a call.

A graph without a patch convolution (a Linear patch embedding, the blocks of
a regionally compiled model, a graph broken before the attention) does not
show the patch size; diffusers models say it in their config:

    WanTransformer3DModel, CosmosTransformer3DModel,     patch_size=(pt, ph, pw)
    Kandinsky5Transformer3DModel, SkyReels-V2, Helios
    HunyuanVideoTransformer3DModel, Allegro, LTX-Video,  patch_size=p, patch_size_t=pt
    CogVideoXTransformer3DModel (1.5: patch_size_t=2)
    CogVideoX 1.0, Mochi, EasyAnimate                    patch_size=p (patch_size_t None or absent: 1)

In each, the token grid is (T // pt, H // ph, W // pw) of the latent (T, H, W).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from .passes.config import _int_tuple, _is_int

log = logging.getLogger(__name__)


def _config_value(config, name: str):
    if isinstance(config, Mapping):  # diffusers' FrozenDict, a plain dict
        return config.get(name)
    return getattr(config, name, None)


def model_patch(model: nn.Module) -> tuple[int, int, int] | None:
    """The patch size (pt, ph, pw) that ``model.config`` gives, or None when it gives none that reads so.

    Example:
        >>> model_patch(WanTransformer3DModel(patch_size=(1, 2, 2), ...))
        (1, 2, 2)
        >>> model_patch(HunyuanVideoTransformer3DModel(patch_size=2, patch_size_t=1, ...))
        (1, 2, 2)
        >>> model_patch(nn.Linear(4, 4)) is None
        True
    """
    config = getattr(model, "config", None)
    if config is None:
        return None
    patch, patch_t = _config_value(config, "patch_size"), _config_value(config, "patch_size_t")
    patch_t = 1 if patch_t is None else patch_t
    if _is_int(patch):
        shape = (patch_t, patch, patch)
    else:
        shape = _int_tuple(patch) if isinstance(patch, (tuple, list)) else None
        shape = (patch_t, *shape) if shape is not None and len(shape) == 2 else shape
    if shape is None or len(shape) != 3 or not all(_is_int(d) and d > 0 for d in shape):
        if patch is not None:  # a config field of another meaning (an image model's nested patch sizes)
            log.info("draftopt: model.config.patch_size=%r, patch_size_t=%r is no (pt, ph, pw); not used",
                     patch, patch_t)
        return None
    return tuple(int(d) for d in shape)


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules diffusers' ``compile_repeated_blocks`` would compile (classes named in ``_repeated_blocks``).

    Raises ValueError naming the fix when the model names none or none is found.
    """
    names = getattr(model, "_repeated_blocks", None)
    if not names:
        raise ValueError(f"regional=True needs a model whose class lists its repeated blocks in "
                         f"`_repeated_blocks` (diffusers >= 0.35 models do); {type(model).__name__} has none. "
                         "Use regional=False to compile the whole model")
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"regional=True: no module of the classes {list(names)} (the model's "
                         "`_repeated_blocks`) in the model; use regional=False")
    return blocks


def check_call_latent(latent_shape: tuple, args, kwargs, model: nn.Module | None = None,
                      regional: bool = True) -> None:
    """ValueError unless a 5-D latent the model is called with has ``latent_shape`` as its (T, H, W).

    For graphs that cannot check it themselves (a regionally compiled model's blocks see tokens only): a
    call at another resolution with as many tokens would otherwise reuse the grid of the first. The latent
    is ``hidden_states`` (or the first positional tensor); channels may come first ([B, C, T, H, W]),
    second ([B, T, C, H, W], CogVideoX) or last ([B, T, H, W, C], Kandinsky 5). Other inputs (packed tokens,
    as LTX-Video's) are not checked. ``model`` (the original model): the error names this call's (T, H, W).
    """
    x = kwargs.get("hidden_states")
    if x is None:
        x = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if not isinstance(x, torch.Tensor) or latent_matches(latent_shape, tuple(x.shape)):
        return
    s = tuple(x.shape)
    thw = None
    if model is not None:
        config = getattr(model, "config", None)
        thw, _ = latent_thw(type(model).__name__, None if config is None else _config_value(config, "in_channels"), s)
    this = f"latent_shape={thw}" if thw is not None else "this call's latent_shape=(T, H, W)"
    fixed = ("regional=True compiles the repeated blocks for one latent_shape" if regional else
             "latent_shape fixes the token grid of every call")
    instead = "with regional=False and latent_shape=None" if regional else "with latent_shape=None"
    raise ValueError(
        f"latent_shape {tuple(latent_shape)} does not match the latent this model is called with: hidden_states "
        f"is {s}{f' (T, H, W = {thw[0]}x{thw[1]}x{thw[2]})' if thw is not None else ''}. {fixed}: for this "
        f"resolution optimize again with {this} (draftopt.optimize(model, ...) reconfigures the model), or "
        f"{instead} to read each call's grid off the patch embedding"
    )


def latent_matches(latent_shape: tuple, s: tuple) -> bool:
    """Whether a call's hidden_states of shape ``s`` has ``latent_shape`` as its (T, H, W) (channels at
    axis 1, 2 or 4); True for a shape that is not 5-D (nothing to check)."""
    return len(s) != 5 or tuple(latent_shape) in (s[2:], (s[1], *s[3:]), s[1:4])


def check_latent_shape(latent_shape: tuple, s: tuple) -> None:
    """ValueError unless ``latent_matches``: the check on the shape of the call's hidden_states."""
    if not latent_matches(latent_shape, s):
        raise ValueError(
            f"latent_shape {tuple(latent_shape)} does not match the latent this model is called with: "
            f"hidden_states is {s}. Pass this call's (T, H, W), or latent_shape=None to read it off each call"
        )


# -- what the diffusers attention backend reads off the model (it sees calls, not a graph) ----------------------
# Where joint-attention video models put the text tokens in their self-attention sequence (read off each
# processor's torch.cat of query and text query in diffusers 0.42.1); models absent here have no text tokens in
# self-attention (Wan, LTX-Video, Cosmos: text is cross-attention) or need text_position= from the user.
FAMILY_TEXT_POSITION = {
    "HunyuanVideoTransformer3DModel": "end",
    "HunyuanVideo15Transformer3DModel": "end",
    "HunyuanVideoFramepackTransformer3DModel": "end",
    "MotifVideoTransformer3DModel": "end",
    "CogVideoXTransformer3DModel": "start",
    "ConsisIDTransformer3DModel": "start",
    "EasyAnimateTransformer3DModel": "start",
    "HeliosTransformer3DModel": "start",  # history latents before the video; the text is cross-attention
}
# Models whose hidden-state stream is [history latents, video]: the history concatenated before the first block
# (its concatenation is in the graph only where no graph break separates it from the blocks).
FAMILY_HISTORY_BEFORE_GRID = frozenset({"HunyuanVideoFramepackTransformer3DModel", "HeliosTransformer3DModel"})
# The call arguments that carry those history latents (the diffusers backend cannot place them in a sequence).
FAMILY_HISTORY_INPUTS = {
    "HunyuanVideoFramepackTransformer3DModel": ("latents_clean", "latents_history_2x", "latents_history_4x"),
}
# The channel axis of the 5-D latent a model is called with, where it is not 1 ([B, C, T, H, W]).
FAMILY_CHANNEL_AXIS = {
    "CogVideoXTransformer3DModel": 2,  # [B, T, C, H, W]
    "ConsisIDTransformer3DModel": 2,
    "Kandinsky5Transformer3DModel": 4,  # [B, T, H, W, C]
}


def history_before_grid(model: nn.Module) -> bool:
    """Whether ``model`` concatenates history latents before its video tokens (FramePack, Helios), by its class."""
    return type(model).__name__ in FAMILY_HISTORY_BEFORE_GRID


def text_position_of(model: nn.Module) -> str | None:
    """Where ``model``'s self-attention puts its text tokens ("start" / "end"), by its class; None: unknown.

    Example:
        >>> text_position_of(HunyuanVideoTransformer3DModel(...))
        'end'
    """
    return FAMILY_TEXT_POSITION.get(type(model).__name__)


def latent_thw(model_name: str, in_channels, shape: tuple) -> tuple[tuple[int, int, int] | None, str]:
    """((T, H, W), how) of a 5-D latent of ``shape`` that a model of class ``model_name`` is called with, or
    (None, why not). The channel axis is the family's (``FAMILY_CHANNEL_AXIS``, else 1), checked against
    ``config.in_channels`` where the config has it; a shape whose channel axis is unclear gives None.

    Example:
        >>> latent_thw("WanTransformer3DModel", 16, (1, 16, 21, 60, 104))
        ((21, 60, 104), 'hidden_states (1, 16, 21, 60, 104), channels at axis 1')
    """
    if len(shape) != 5:
        return None, (f"hidden_states {shape} is not a 5-D latent (packed tokens?): pass latent_shape=(T, H, W) "
                      "of the latent")
    axis = FAMILY_CHANNEL_AXIS.get(model_name, 1)
    if _is_int(in_channels) and shape[axis] != in_channels:
        matches = [a for a in (1, 2, 4) if shape[a] == in_channels]
        if len(matches) != 1:
            return None, (f"hidden_states {shape}: no single channel axis of size in_channels={in_channels}; pass "
                          "latent_shape=(T, H, W)")
        axis = matches[0]
    thw = tuple(d for i, d in enumerate(shape) if i not in (0, axis))
    return thw, f"hidden_states {shape}, channels at axis {axis}"
