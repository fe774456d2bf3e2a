"""Inputs for benchmarks/fidelity.py: q, k, v that look like a video DiT's self-attention, not white noise.

    python benchmarks/fidelity.py            # uses these; --quick for a tiny config

Each case is built in four steps, all deterministic given (image, seed, grid, head dim, head kind):

1. clip: a real photograph from ``skimage.data`` (astronaut, coffee, ...), a crop of it that pans a
   few pixels per frame (random direction per seed), resized to ``2H x 2W`` pixels per frame, plus
   a little pixel noise (a diffusion latent part-way through denoising is not clean).
2. tokens: 2 x 2 patches (the usual DiT patching) of the clip and of two blurred copies of it (so a
   token also sees its neighbourhood, as the VAE + earlier layers make it), a fixed random
   projection to the model width, a random GELU MLP with a residual and a LayerNorm without affine.
3. per head, content parts ``qc = rms(x Wq)``, ``kc = rms(rho x Wq + sqrt(1 - rho^2) x Wk')``:
   ``rho`` sets how much a token prefers keys of similar content (q and k share a projection),
   ``content`` (in logits) how sharply.
4. positions: a shared vector ``beta`` is added to q and k before a 3D rotary embedding (the head
   dim split into t / h / w pairs as in Wan / HunyuanVideo, base 256 as HunyuanVideo). Since
   ``R_m beta . R_n beta = sum_f |beta_f|^2 cos(theta_f (m - n))``, that term is a bias peaked at
   ``m = n`` along each axis: ``strength`` (in logits) is its height, ``freq`` multiplies the
   rotary frequencies and so narrows it.

Head kinds (``HEAD_KINDS``), as video DiTs are reported to have:

- ``spatial``: strong, narrow t bias (another frame costs ~6 logits), mild wide h / w bias: the
  head attends within its own frame (99% of its mass in the default run).
- ``temporal``: strong, narrow h / w bias (one token away costs ~3 logits, two ~5) and no t bias:
  the same position in every frame.
- ``local``: moderate bias on all three axes: a 3D neighbourhood window.
- ``content``: no rotary and no bias, sharp content similarity (rho 0.9): what the head attends to
  depends on the image only (the same object across frames, similar textures far apart).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

IMAGES = ("astronaut", "coffee", "camera")  # the default; any skimage.data image (chelsea, rocket, ...) works
ROPE_BASE = 256.0
MODEL_DIM = 192


@dataclass(frozen=True)
class Axis:
    """Positional bias along one axis: ``strength`` logits at distance 0, rotary frequencies x ``freq``."""

    strength: float = 0.0
    freq: float = 1.0


@dataclass(frozen=True)
class HeadKind:
    content: float  # logits of a token with itself from content alone (rho = 1)
    rho: float  # correlation of the q and k content projections
    t: Axis = field(default_factory=Axis)
    h: Axis = field(default_factory=Axis)
    w: Axis = field(default_factory=Axis)
    rotary: bool = True


HEAD_KINDS = {
    "spatial": HeadKind(content=3.0, rho=0.5, t=Axis(8.0, 3.0), h=Axis(2.0, 0.5), w=Axis(2.0, 0.5)),
    "temporal": HeadKind(content=2.0, rho=0.5, h=Axis(6.0, 2.0), w=Axis(6.0, 2.0)),
    "local": HeadKind(content=2.0, rho=0.5, t=Axis(3.0, 1.0), h=Axis(4.0, 0.7), w=Axis(4.0, 0.7)),
    "content": HeadKind(content=7.0, rho=0.9, rotary=False),
}


def stable_seed(*parts) -> int:
    """A seed from the parts' repr, the same in every process (hash() of a str is salted)."""
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


# -- 1. clip ---------------------------------------------------------------------------------------
def load_image(name: str) -> np.ndarray:
    """float64 [H, W, 3] in [0, 1]; grey images get three equal channels, alpha is dropped."""
    import skimage.data
    from skimage.util import img_as_float

    img = img_as_float(getattr(skimage.data, name)())
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    return img[..., :3]


def pan_clip(img: np.ndarray, frames: int, size: tuple[int, int], rng: np.random.Generator,
             pan_px: float = 2.0, noise: float = 0.05) -> np.ndarray:
    """[T, h, w, 3]: a crop of ``img`` moving ``pan_px`` output pixels per frame, resized to ``size``."""
    from skimage.transform import resize

    h, w = size
    H0, W0, _ = img.shape
    scale = 0.75 * min(H0 / h, W0 / w)  # crop = 75% of the image's fitting side: room to pan
    ch, cw = int(h * scale), int(w * scale)
    angle = rng.uniform(0, 2 * math.pi)
    step = pan_px * scale * np.array([math.sin(angle), math.cos(angle)])
    start = np.array([(H0 - ch) / 2, (W0 - cw) / 2]) - step * (frames - 1) / 2  # centred path
    out = []
    for f in range(frames):
        y, x = np.clip(np.round(start + f * step).astype(int), 0, [H0 - ch, W0 - cw])
        out.append(resize(img[y:y + ch, x:x + cw], (h, w), anti_aliasing=True))
    clip = np.stack(out)
    return clip + noise * rng.standard_normal(clip.shape)


# -- 2. tokens -------------------------------------------------------------------------------------
def patchify(clip: np.ndarray) -> np.ndarray:
    """[T, 2H, 2W, C] -> [T*H*W, 4C]: 2 x 2 patches in (frame, row, column) order."""
    T, h, w, C = clip.shape
    p = clip.reshape(T, h // 2, 2, w // 2, 2, C).transpose(0, 1, 3, 2, 4, 5)
    return p.reshape(T * (h // 2) * (w // 2), 4 * C)


def embed(clip: np.ndarray, gen: torch.Generator, dim: int = MODEL_DIM) -> torch.Tensor:
    """Tokens [N, dim] float64: patch + blurred-context features -> random proj -> GELU MLP -> LayerNorm."""
    from skimage.filters import gaussian

    clip = (clip - clip.mean()) / clip.std()
    views = [clip] + [gaussian(clip, sigma=(0, s, s), channel_axis=-1) for s in (2.0, 6.0)]
    feats = torch.from_numpy(np.concatenate([patchify(v) for v in views], axis=1))
    rand = lambda i, o: torch.randn(i, o, generator=gen, dtype=torch.float64) / math.sqrt(i)  # noqa: E731
    x = feats @ rand(feats.shape[1], dim)
    x = x + torch.nn.functional.gelu(x @ rand(dim, dim)) @ rand(dim, dim)  # rank beyond the 36 inputs
    return torch.nn.functional.layer_norm(x, (dim,))


# -- 3, 4. heads -----------------------------------------------------------------------------------
def rope_pairs(D: int) -> tuple[int, int, int]:
    """Rotary pairs of the t, h and w axes (h and w a third each, t the rest, as Wan splits)."""
    n = D // 2
    return n - 2 * (n // 3), n // 3, n // 3


def grid_positions(grid) -> torch.Tensor:
    """[N, 3] float64 (t, h, w) of each token in (frame, row, column) order."""
    T, H, W = grid
    t, h, w = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in (T, H, W)), indexing="ij")
    return torch.stack([t, h, w], dim=-1).reshape(-1, 3)


def rope_angles(grid, D: int, kind: HeadKind) -> torch.Tensor:
    """[N, D/2] rotation angle of each pair: position x base^(-i/n) x the axis's ``freq``."""
    pos, parts = grid_positions(grid), []
    for a, (n, axis) in enumerate(zip(rope_pairs(D), (kind.t, kind.h, kind.w))):
        theta = ROPE_BASE ** (-torch.arange(n, dtype=torch.float64) / n) * axis.freq
        parts.append(pos[:, a:a + 1] * theta)
    return torch.cat(parts, dim=1)


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on consecutive pairs (x[2i], x[2i+1])."""
    a, b = x[..., 0::2], x[..., 1::2]
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


def position_bias_vector(D: int, kind: HeadKind, gen: torch.Generator) -> torch.Tensor:
    """beta [D]: on each axis's pairs, energy ~ sqrt(theta) (a window, not a plateau) x a random factor,
    scaled so the bias is ``strength`` logits at distance 0 (beta.beta / sqrt(D) = sum of strengths)."""
    energies = []
    for n, axis in zip(rope_pairs(D), (kind.t, kind.h, kind.w)):
        e = ROPE_BASE ** (-torch.arange(n, dtype=torch.float64) / (2 * n))
        e = e * (0.5 + torch.rand(n, generator=gen, dtype=torch.float64))
        energies.append(axis.strength * math.sqrt(D) * e / e.sum())
    amp = torch.cat(energies).sqrt()
    phase = torch.rand(D // 2, generator=gen, dtype=torch.float64) * 2 * math.pi
    return torch.stack([amp * phase.cos(), amp * phase.sin()], dim=-1).flatten()


def rms(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True))


def head_qkv(x: torch.Tensor, grid, D: int, kind: HeadKind, gen: torch.Generator):
    """One head's (q, k, v), each [N, D] float64, from tokens ``x`` [N, C]."""
    C = x.shape[1]
    Wq, Wk, Wv = (torch.randn(C, D, generator=gen, dtype=torch.float64) / math.sqrt(C) for _ in range(3))
    g = math.sqrt(kind.content / math.sqrt(D))  # g^2 qc.kc / sqrt(D) = content at rho = 1, same token
    q = g * rms(x @ Wq)
    k = g * rms(kind.rho * (x @ Wq) + math.sqrt(1 - kind.rho ** 2) * (x @ Wk))
    if kind.rotary:
        beta = position_bias_vector(D, kind, gen)
        angles = rope_angles(grid, D, kind)
        q, k = rotate(q + beta, angles), rotate(k + beta, angles)
    return q, k, x @ Wv


# -- cases -----------------------------------------------------------------------------------------
@dataclass
class Case:
    """One attention input: q, k, v [1, heads, L, D] float32 and what it was made from."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    geom: object  # draftopt.kernels.Geometry
    meta: dict


def clip_tokens(image: str, seed: int, grid) -> torch.Tensor:
    T, H, W = grid
    rng = np.random.default_rng(stable_seed("clip", image, seed, grid))
    clip = pan_clip(load_image(image), T, (2 * H, 2 * W), rng)
    return embed(clip, torch.Generator().manual_seed(stable_seed("embed", image, seed, grid)))


def build_cases(images, seeds, grids, dims, kinds, heads: int = 2, device="cpu"):
    """Yield a Case per (image, seed, (grid, tile), D, head kind), each with ``heads`` heads.

    ``grids`` is a list of ((T, H, W), (th, tw)); tokens are built once per (image, seed, grid).
    """
    from draftopt.kernels import Geometry

    for image in images:
        for seed in seeds:
            for grid, tile in grids:
                x = clip_tokens(image, seed, tuple(grid))
                geom = Geometry(tuple(grid), tuple(tile))
                for D in dims:
                    for name in kinds:
                        gen = torch.Generator().manual_seed(stable_seed("head", image, seed, grid, D, name))
                        qkv = [head_qkv(x, grid, D, HEAD_KINDS[name], gen) for _ in range(heads)]
                        q, k, v = (torch.stack(t)[None].to(device, torch.float32) for t in zip(*qkv))
                        meta = dict(image=image, seed=seed, grid="x".join(map(str, grid)),
                                    tile="x".join(map(str, tile)), D=D, kind=name)
                        yield Case(q, k, v, geom, meta)
