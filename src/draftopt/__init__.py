"""draftopt: draft-attention sparse attention for video diffusion transformers.

    model = draftopt.optimize(model, latent_shape=(T, H, W), sparsity=0.9)
    model = torch.compile(model, backend="draftopt")   # the backend, by name
    print(draftopt.report(model))

Importing draftopt registers its torch.library ops (namespace ``draftopt``)
and nothing else. Layers, imported one way: draftopt (API, backend, report)
-> draftopt.passes (FX rewrite) -> draftopt.kernels (ops and kernels).
"""

from . import kernels  # registers the ops
from .api import DenseWarmup, DraftOptimizedModule, dense, optimize, report, reset
from .backend import draftopt_backend
from .kernels import DraftBlockMask, Geometry, captured_masks, draft_attention
from .passes import DraftConfig
from .pictures import save_mask_images
from .report import Report

__all__ = [
    "DenseWarmup", "DraftBlockMask", "DraftConfig", "DraftOptimizedModule", "Geometry", "Report",
    "captured_masks", "dense", "draft_attention", "draftopt_backend", "kernels", "optimize", "report", "reset",
    "save_mask_images",
]
__version__ = "0.1.0"
