"""draftopt.kernels: Triton kernels and their torch.library ops (namespace ``draftopt``).

Each stage of draft attention is one op with a Triton implementation (CUDA), a
fake implementation (for torch.compile) and a pure-PyTorch implementation used
on every other device and as the test oracle:

==========================================  ==========================================
op                                          stage
==========================================  ==========================================
``torch.ops.draftopt.tile_pool``            1 pool q / k over each tile
``torch.ops.draftopt.draft_map``            2 softmax(q_pool k_pool^T * scale)
``torch.ops.draftopt.select_blocks``        2 draft map -> kv_idx, kv_cnt (policy)
``torch.ops.draftopt.permute_tiles``        3 tokens -> tile-major, padded
``torch.ops.draftopt.key_bias``             4 key padding mask -> tile-major bias
``torch.ops.draftopt.block_sparse_attention`` 4 flash attention over selected tiles
``torch.ops.draftopt.unpermute_tiles``      5 tile-major -> original order
``torch.ops.draftopt.tiled_attention``      3-5 fused: tiles addressed in place
==========================================  ==========================================

``draft_attention`` runs all five. Importing this package registers the ops.
"""

from .attention import (block_sparse_attention, check_key_padding_mask, key_padding_bias, permuted_key_bias,
                        tiled_attention)
from .block_mask import DraftBlockMask
from .capture import captured_masks
from .draft_attention import draft_attention
from .geometry import Geometry
from .permute import permute_tiles, unpermute_tiles
from .pool import tile_pool
from .select import POLICIES, draft_map, select_blocks

__all__ = [
    "Geometry", "DraftBlockMask", "POLICIES",
    "tile_pool", "draft_map", "select_blocks", "permute_tiles", "unpermute_tiles",
    "block_sparse_attention", "captured_masks", "draft_attention", "key_padding_bias", "permuted_key_bias",
    "check_key_padding_mask", "tiled_attention",
]
