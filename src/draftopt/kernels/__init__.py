"""draftopt.kernels: the draft-attention ops (torch.library namespace ``draftopt``) and their kernels.

Each stage is one op with a GPU implementation (Triton; the attention also in
Gluon for Hopper), a fake implementation (for torch.compile) and a pure-PyTorch
implementation used on every other device and as the test oracle:

==============================================  ==========================================
op                                              stage
==============================================  ==========================================
``torch.ops.draftopt.tile_pool``                1 pool q / k over each tile
``torch.ops.draftopt.draft_map``                2 softmax(q_pool k_pool^T * scale)
``torch.ops.draftopt.tile_moments``             1 tile means and spreads (policy "mass")
``torch.ops.draftopt.block_mass``               2 estimated attention mass per tile pair
``torch.ops.draftopt.select_blocks``            2 draft map -> kv_idx, kv_cnt (policy)
``torch.ops.draftopt.permute_tiles``            3 tokens -> tile-major, padded
``torch.ops.draftopt.key_bias``                 4 key padding mask -> tile-major bias
``torch.ops.draftopt.block_sparse_attention``   4 flash attention over selected tiles
``torch.ops.draftopt.unpermute_tiles``          5 tile-major -> original order
``torch.ops.draftopt.tiled_attention``          3-5 fused: tiles addressed in place
``torch.ops.draftopt.attend_sm90[_in_place]``   4 / 3-5 on Hopper (the Gluon kernel)
``torch.ops.draftopt.record_mask``              inspection: keep each call's block mask
==============================================  ==========================================

Layout: ``ops/`` (one file an op: registration, reference, wrapper), ``triton/``
and ``gluon/`` (device code and launchers), ``dispatch.py`` (which attention
kernel runs a site), ``geometry.py`` (token layout), ``layout.py`` (which tiling a site
uses: tiles, raster strips, or the least padding), ``sparsity.py`` (policies).
``draft_attention`` runs all five stages. Importing this package registers the ops.
"""

from .block_mask import DraftBlockMask
from .dispatch import AttentionPlan, Backend, plan
from .draft_attention import draft_attention, score_map
from .geometry import Geometry
from .layout import TileLayout, tile_layout
from .ops.attention import block_sparse_attention, tiled_attention
from .ops.attention_sm90 import _attend_sm90_op  # noqa: F401  (registers draftopt::attend_sm90*)
from .ops.block_mass import block_mass
from .ops.draft_map import draft_map
from .ops.key_bias import check_key_padding_mask, key_padding_bias, needs_visual_bias, permuted_key_bias
from .ops.permute import permute_tiles, unpermute_tiles
from .ops.pool import tile_moments, tile_pool
from .ops.record_mask import captured_masks
from .ops.select import select_blocks
from .sparsity import POLICIES

__all__ = [
    "AttentionPlan", "Backend", "DraftBlockMask", "Geometry", "POLICIES", "TileLayout",
    "block_mass", "block_sparse_attention", "captured_masks", "check_key_padding_mask", "draft_attention", "draft_map",
    "key_padding_bias", "needs_visual_bias", "permute_tiles", "permuted_key_bias", "plan", "score_map", "select_blocks",
    "tile_layout", "tile_moments", "tile_pool", "tiled_attention", "unpermute_tiles",
]
