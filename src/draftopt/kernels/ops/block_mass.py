"""Stage 2a of policy "mass": ``draftopt::block_mass`` -> M [B, heads, S, S] float32.

M[i, j] estimates the attention mass that the query tokens of tile i put on
the key tokens of tile j (so row i sums to n_i, tile i's real tokens). The
paper's draft map softmax(scale q_i . k_j) compares tile *means*; two things
it leaves out decide which blocks matter:

- tile sizes: a partial tile at the frame edge has fewer keys to attend to
  (log n_j in the logit) and fewer queries whose mass counts (the n_i factor);
- spread: for tokens spread around their tile means, the mean of exp(q . k)
  exceeds exp of the mean. With an isotropic spread v (variance per dim,
  from ``tile_moments``), the second-order (log-normal) correction of the
  logit is scale^2 / 2 * (v_q |k_j|^2 + |q_i|^2 v_k + D v_q v_k).

Both fold into one draft map over D + 4 features, so the draft map kernel
computes M. On benchmarks/fidelity.py this closes most of the gap between
the paper's rule and the oracle (numbers in docs/design.md).

Example:
    >>> from draftopt.kernels import Geometry, block_mass, tile_moments
    >>> g = Geometry((1, 12, 20), tile=(8, 16))  # tiles of 128, 32, 64 and 16 tokens
    >>> x = torch.randn(1, 2, g.seq_len, 64)
    >>> M = block_mass(*tile_moments(x, g), *tile_moments(x, g), g, 0.125)
    >>> M.sum(-1)[0, 0].round().tolist()
    [128.0, 32.0, 64.0, 16.0]
"""

from __future__ import annotations

import torch
from torch.library import triton_op

from .._utils import make_inference_only, refuse_grad
from ..dispatch import Backend, stage_backend
from ..geometry import Geometry, tile_token_counts
from ..triton.draft_map import draft_map_triton
from .draft_map import draft_map_reference


def extra_features(q_mean, q_spread, k_mean, k_spread, counts, scale: float):
    """The 4 query and key features beside the means whose dot product adds the corrections (module doc)."""
    D = q_mean.shape[-1]
    c = 0.5 * scale * scale
    q_sq, k_sq = q_mean.pow(2).sum(-1, keepdim=True), k_mean.pow(2).sum(-1, keepdim=True)
    qv, kv = q_spread.unsqueeze(-1), k_spread.unsqueeze(-1)
    log_n = counts.to(k_mean.dtype).log().expand(*k_mean.shape[:-1])[..., None]
    return (torch.cat([c * qv, c * q_sq, (c * D) * qv, torch.ones_like(qv)], dim=-1),
            torch.cat([k_sq, kv, kv, log_n], dim=-1))


def mass_features(q_mean, q_spread, k_mean, k_spread, counts, scale: float):
    """Query and key features whose dot product is the corrected logit (see the module doc)."""
    q_extra, k_extra = extra_features(q_mean, q_spread, k_mean, k_spread, counts, scale)
    return torch.cat([scale * q_mean, q_extra], dim=-1), torch.cat([k_mean, k_extra], dim=-1)


def block_mass_reference(q_mean, q_spread, k_mean, k_spread, geom: Geometry, scale: float) -> torch.Tensor:
    acc = torch.float64 if q_mean.dtype == torch.float64 else torch.float32
    counts = tile_token_counts(geom, q_mean.device).to(acc)
    qf, kf = mass_features(q_mean.to(acc), q_spread.to(acc), k_mean.to(acc), k_spread.to(acc), counts, scale)
    return draft_map_reference(qf, kf, 1.0) * counts[:, None]


@triton_op("draftopt::block_mass", mutates_args=())
def _block_mass_op(
    q_mean: torch.Tensor, q_spread: torch.Tensor, k_mean: torch.Tensor, k_spread: torch.Tensor,
    T: int, H: int, W: int, th: int, tw: int, text_len: int, text_before: int, scale: float,
) -> torch.Tensor:
    geom = Geometry.from_op_args(T, H, W, th, tw, text_len, text_before)
    if stage_backend(q_mean) is not Backend.TRITON:
        return block_mass_reference(q_mean, q_spread, k_mean, k_spread, geom, scale)
    counts = tile_token_counts(geom, q_mean.device).float()
    q_mean, k_mean = q_mean.float(), k_mean.float()
    # the D-wide product apart from the 4 extra features, so it keeps a power-of-two width
    q_extra, k_extra = extra_features(q_mean, q_spread.float(), k_mean, k_spread.float(), counts, scale)
    return draft_map_triton(scale * q_mean, k_mean, 1.0, q_extra, k_extra, counts)


make_inference_only(_block_mass_op, "block_mass")


def block_mass(q_mean, q_spread, k_mean, k_spread, geom: Geometry, scale: float) -> torch.Tensor:
    """Estimated attention mass per (query tile, key tile), float32 [B, heads, S, S] (see module doc)."""
    if q_mean.dim() != 4 or q_mean.shape != k_mean.shape or q_mean.shape[-2] != geom.n_tiles:
        raise ValueError(f"block_mass expects tile means [B, heads, S={geom.n_tiles}, D] for q and k, got "
                         f"{tuple(q_mean.shape)} and {tuple(k_mean.shape)}")
    if q_spread.shape != q_mean.shape[:-1] or k_spread.shape != k_mean.shape[:-1]:
        raise ValueError(f"block_mass expects spreads [B, heads, S], got {tuple(q_spread.shape)} and "
                         f"{tuple(k_spread.shape)}")
    refuse_grad("block_mass", q_mean, k_mean)
    return torch.ops.draftopt.block_mass(q_mean, q_spread, k_mean, k_spread, *geom.op_args(), float(scale))
