"""draftopt.passes: torch.fx passes over Dynamo graphs.

- ``find_attention_sites``: SDPA calls and explicit softmax attention.
- ``grid_sources`` / ``text_before_from_graph``: a site's token geometry.
- ``DraftAttentionPass``: rewrite eligible sites into the draftopt ops.
- ``DraftConfig``: every option of the pass, validated up front.
"""

from .config import COMPILERS, MIN_TOKENS, DraftConfig
from .draft_attention_pass import DraftAttentionPass, ModelContext, SitePlan, SiteRecord
from .infer_geometry import grid_sources, text_before_from_graph
from .sites import AttentionSite, find_attention_sites, module_path

__all__ = [
    "AttentionSite", "COMPILERS", "DraftAttentionPass", "DraftConfig", "MIN_TOKENS", "ModelContext", "SitePlan", "SiteRecord",
    "find_attention_sites", "grid_sources", "module_path", "text_before_from_graph",
]
