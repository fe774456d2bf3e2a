"""``draftopt::record_mask``: capturing block masks at run time, for pictures and inspection.

With ``DraftConfig(capture_masks=True)`` the pass routes each site's ``kv_cnt``
through this op, which keeps a copy of the site's selection and draft map on
the device and returns ``kv_cnt`` unchanged. Off by default: graphs compiled
without it contain no trace of it and pay nothing. Capturing stores one copy
per call (memory grows with calls: take and clear with
``captured_masks(clear=True)``); it is not for CUDA-graph replays, which skip
Python.
"""

from __future__ import annotations

import torch

from ..block_mask import DraftBlockMask
from ..geometry import Geometry

_STORE: dict[str, list] = {}


@torch.library.custom_op("draftopt::record_mask", mutates_args=())
def record_mask(kv_idx: torch.Tensor, kv_cnt: torch.Tensor, draft_map: torch.Tensor, site: str, T: int, H: int,
                W: int, th: int, tw: int, text_len: int, text_before: int, policy: str,
                sparsity: float) -> torch.Tensor:
    """Keep (kv_idx, kv_cnt, draft map) of one call of ``site``; returns a copy of kv_cnt."""
    geom = Geometry.from_op_args(T, H, W, th, tw, text_len, text_before)
    _STORE.setdefault(site, []).append(
        DraftBlockMask(kv_idx.clone(), kv_cnt.clone(), geom, policy, sparsity, draft_map=draft_map.clone()))
    return kv_cnt.clone()


@record_mask.register_fake
def _(kv_idx, kv_cnt, draft_map, site, T, H, W, th, tw, text_len, text_before, policy, sparsity):
    return torch.empty_like(kv_cnt)


# A side effect the compilers must keep: without this AOTAutograd (aot_eager, inductor) traced the op as pure
# and its compiled graph never called it (captured_masks() stayed empty).
torch.library._register_effectful_op(record_mask._opoverload, torch.library.EffectType.ORDERED)


def captured_masks(clear: bool = False) -> dict[str, list[DraftBlockMask]]:
    """Block masks recorded so far, per site name (module path), oldest first."""
    out = {k: list(v) for k, v in _STORE.items()}
    if clear:
        _STORE.clear()
    return out
