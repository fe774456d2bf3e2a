"""DraftBlockMask: the block-sparsity pattern chosen for one attention call.

Like FlexAttention's BlockMask, it is a real type: it holds the per (batch,
head, query tile) list of key tiles (``kv_idx`` [B, heads, S, K] int32, first
``kv_cnt`` [B, heads, S] entries valid), renders to a dense boolean block map,
expands to a token-level mask, and prints readably.

Only the visual tiles are listed: text queries and text keys are always dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .geometry import Geometry, original_to_permuted_index
from .sparsity import expected_kept_tiles


def indices_to_dense(kv_idx: torch.Tensor, kv_cnt: torch.Tensor) -> torch.Tensor:
    """(kv_idx [B, H, S, K], kv_cnt [B, H, S]) -> boolean block map [B, H, S, S]."""
    B, H, S, K = kv_idx.shape
    live = torch.arange(K, device=kv_idx.device) < kv_cnt[..., None]
    cols = torch.where(live, kv_idx.long(), S)  # dead slots go to a spare column
    dense = torch.zeros(B, H, S, S + 1, dtype=torch.bool, device=kv_idx.device)
    return dense.scatter_(-1, cols, True)[..., :S]


@dataclass
class DraftBlockMask:
    kv_idx: torch.Tensor
    kv_cnt: torch.Tensor
    geometry: Geometry
    policy: str = "mass"
    requested_sparsity: float = 0.0
    draft_map: torch.Tensor | None = None  # [B, heads, S, S] float32, when kept

    @property
    def shape(self) -> tuple[int, int, int, int]:
        B, H, S, _ = self.kv_idx.shape
        return B, H, S, S

    def to_dense(self) -> torch.Tensor:
        """Boolean [B, heads, S, S]: True where (query tile, key tile) is computed."""
        return indices_to_dense(self.kv_idx, self.kv_cnt)

    def sparsity(self) -> float:
        """Fraction of visual (query tile, key tile) pairs skipped, over all batches and heads."""
        B, H, S, _ = self.shape
        return 1.0 - self.kv_cnt.sum().item() / (B * H * S * S)

    def density(self) -> float:
        return 1.0 - self.sparsity()

    def kept_fraction(self) -> torch.Tensor:
        """[B, heads]: the fraction of visual tile pairs each head computes."""
        S = self.shape[-1]
        return self.kv_cnt.sum(-1).double() / (S * S)

    def estimated_error(self) -> torch.Tensor | None:
        """[B, heads]: the share of the map's mass (the draft's estimate of attention mass) outside the
        kept pairs; None when the map was not kept."""
        if self.draft_map is None:
            return None
        P = self.draft_map.double()
        return 1.0 - (P * self.to_dense()).sum(dim=(-2, -1)) / P.sum(dim=(-2, -1))

    def widened(self) -> torch.Tensor:
        """Bool [B, heads]: heads that keep more pairs than the policy's count (the guard widened them)."""
        S = self.shape[-1]
        budget = expected_kept_tiles(self.policy, self.requested_sparsity, S) + S  # + the diagonal at most
        return self.kv_cnt.sum(-1) > budget

    def to_token_mask(self) -> torch.Tensor:
        """Boolean [B, heads, L, L] in the original token order (text rows and columns dense)."""
        g = self.geometry
        blocks = torch.ones(*self.shape[:2], g.n_blocks, g.n_blocks, dtype=torch.bool,
                            device=self.kv_idx.device)
        blocks[..., : g.n_tiles, : g.n_tiles] = self.to_dense()
        tok_block = original_to_permuted_index(g, self.kv_idx.device) // g.block
        return blocks[:, :, tok_block][:, :, :, tok_block]

    def __repr__(self) -> str:
        B, H, S, _ = self.shape
        return (
            f"DraftBlockMask(batch={B}, heads={H}, tiles={S}x{S}, K={self.kv_idx.shape[-1]}, "
            f"policy={self.policy!r}, requested_sparsity={self.requested_sparsity:g}, "
            f"sparsity={self.sparsity():.3f}, geometry='{self.geometry}')"
        )
