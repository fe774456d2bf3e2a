"""FP8 attention's operands in PyTorch: the reference of ``triton/quantize.py`` and the CPU path.

``fp8_operands(q, k, v, src, block)`` returns (q8, k8, vt8, q_scale, k_scale,
v_scale): tile-major e4m3 q8 and k8 [B, heads, Lp, D], vt8 = V^T [B, heads, D,
Lp] with its tokens in ``fp8_key_order`` within each 16, q_scale per block [B,
heads, Lp / block], k_scale and v_scale per head [B, heads] (float32; x ~ x8 *
scale). k8 is k minus its per-channel mean over
the head's tokens (the softmax does not see it). ``dequantized`` inverts it
into tile-major float32 q, k, v.

Example:
    >>> from draftopt.kernels import Geometry
    >>> from draftopt.kernels.geometry import permuted_source_index
    >>> g = Geometry((2, 8, 16), (8, 16))
    >>> q, k, v = torch.randn(3, 1, 2, g.seq_len, 64).unbind(0)
    >>> q8, k8, vt8, qs, ks, vs = fp8_operands(q, k, v, permuted_source_index(g), g.block)
    >>> q8.dtype, tuple(vt8.shape), tuple(qs.shape)
    (torch.float8_e4m3fn, (1, 2, 64, 256), (1, 2, 2))
"""

from __future__ import annotations

import torch

from ..triton.quantize import E4M3_MAX, fp8_operands_triton
from .permute import gather_rows_reference


def fp8_key_order(n: int, device=None) -> torch.Tensor:
    """The token (tile-major position) in each column of the FP8 kernel's V^T copy: column 16g + 4t + 2h + e
    holds token 16g + 8h + 2t + e. That is the order in which a thread of the kernel holds P's keys once
    each 4 of them share a 32-bit register (the 8-bit wgmma's A operand), so P needs no shuffle between
    threads and V^T is read in the same order (a sum over keys does not depend on their order).

    Example:
        >>> fp8_key_order(16).tolist()
        [0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15]
    """
    if n % 16:
        raise ValueError(f"fp8_key_order needs a multiple of 16 tokens, got {n}")
    c = torch.arange(n, device=device)
    r = c % 16
    return c - r + 8 * ((r // 2) % 2) + 2 * (r // 4) + r % 2


def _scale(amax: torch.Tensor) -> torch.Tensor:
    return torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))


def _finite_abs(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x.isfinite(), x.abs(), 0.0)


def fp8_operands_reference(q, k, v, src: torch.Tensor, block: int):
    """The module doc's tensors, in PyTorch (float32 arithmetic, e4m3's saturating round-to-nearest cast)."""
    B, H, L, D = q.shape
    q, k, v = (t.float() for t in (q, k, v))
    k_fin = k.isfinite()
    k_mean = torch.where(k_fin, k, 0.0).sum(2, keepdim=True) / L
    # max |k - mean| as the kernel finds it: per channel from the finite minimum and maximum
    k_max = torch.where(k_fin, k, float("-inf")).amax(2, keepdim=True)
    k_min = torch.where(k_fin, k, float("inf")).amin(2, keepdim=True)
    k_scale = _scale(torch.maximum(k_max - k_mean, k_mean - k_min).amax((2, 3)))
    v_scale = _scale(_finite_abs(v).amax((2, 3)))
    qp, kp, vp = (gather_rows_reference(t, src) for t in (q, k, v))
    real = (src >= 0)[:, None]
    kp = torch.where(real, kp - k_mean, 0.0)
    blocks = qp.unflatten(2, (-1, block))
    q_scale = _scale(_finite_abs(blocks).amax((3, 4)))
    q8 = (blocks / q_scale[..., None, None]).flatten(2, 3).to(torch.float8_e4m3fn)
    k8 = (kp / k_scale[..., None, None]).to(torch.float8_e4m3fn)
    vt8 = (vp / v_scale[..., None, None]).to(torch.float8_e4m3fn).transpose(2, 3)
    vt8 = vt8[..., fp8_key_order(vt8.shape[-1], vt8.device)].contiguous()
    return q8, k8, vt8, q_scale, k_scale, v_scale


def fp8_operands(q, k, v, src: torch.Tensor, block: int):
    """The FP8 operands on q's device: Triton kernels on CUDA, else PyTorch."""
    if q.is_cuda:
        return fp8_operands_triton(q, k, v, src, block)
    return fp8_operands_reference(q, k, v, src, block)


def dequantized(q8, k8, vt8, q_scale, k_scale, v_scale, block: int):
    """Tile-major float32 q, k (minus its mean), v from the FP8 operands."""
    q = (q8.float().unflatten(2, (-1, block)) * q_scale[..., None, None]).flatten(2, 3)
    k = k8.float() * k_scale[..., None, None]
    token_column = torch.argsort(fp8_key_order(vt8.shape[-1], vt8.device))
    v = vt8.float()[..., token_column].transpose(2, 3) * v_scale[..., None, None]
    return q, k, v
