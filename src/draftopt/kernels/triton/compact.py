"""Kept set -> ascending index lists on the GPU: one prefix-sum compaction per row."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import launcher, next_pow2


@triton.jit
def _compact_kernel(Keep, Idx, Cnt, S, K, BLOCK_C: tl.constexpr):
    """Row r of Keep [rows, S] -> Idx[r, :cnt] = kept columns ascending, rest = diagonal."""
    row = tl.program_id(0).to(tl.int64)
    diag = (row % S).to(tl.int32)
    count = 0
    for c0 in range(0, S, BLOCK_C):
        offs = c0 + tl.arange(0, BLOCK_C)
        keep = tl.load(Keep + row * S + offs, mask=offs < S, other=0).to(tl.int32)
        pos = count + tl.cumsum(keep, axis=0) - keep
        tl.store(Idx + row * K + pos, offs.to(tl.int32), mask=(keep != 0) & (pos < K))
        count += tl.sum(keep, axis=0)
    count = tl.minimum(count, K)
    for c0 in range(0, K, BLOCK_C):  # unused slots point at the diagonal: always a valid tile
        offs = c0 + tl.arange(0, BLOCK_C)
        fill = tl.zeros([BLOCK_C], dtype=tl.int32) + diag
        tl.store(Idx + row * K + offs, fill, mask=(offs < K) & (offs >= count))
    tl.store(Cnt + row, count.to(tl.int32))


def compact_triton(keep: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept set [B, heads, S, S] bool -> (kv_idx [B, heads, S, K], kv_cnt [B, heads, S]) int32."""
    B, H, S, _ = keep.shape
    keep_u8 = keep.to(torch.uint8)  # Inductor cannot lower a bool -> uint8 view
    idx = torch.empty((B, H, S, K), dtype=torch.int32, device=keep.device)
    cnt = torch.empty((B, H, S), dtype=torch.int32, device=keep.device)
    launcher(_compact_kernel)[(B * H * S,)](keep_u8, idx, cnt, S, K, BLOCK_C=min(1024, next_pow2(S)))
    return idx, cnt
