"""draftopt: draft-attention sparse attention for video diffusion transformers.

    model = draftopt.optimize(model, latent_shape=(T, H, W), sparsity=0.9)
    model = torch.compile(model, backend="draftopt")   # the backend, by name
    print(draftopt.report(model))

Importing draftopt registers its torch.library ops (namespace ``draftopt``)
and nothing else.
"""

import os as _os

# Installed, kernels/ and passes/ are the subpackages draftopt.kernels and
# draftopt.passes (pyproject.toml maps them). In a source checkout on sys.path
# (tests run from the repo root, a GPU box without an install) they sit beside
# this folder: let the import system find them there too.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "kernels")) and _os.path.isfile(
    _os.path.join(_root, "kernels", "__init__.py")
):
    __path__.append(_root)  # noqa: F821 (package __path__)

from . import kernels  # noqa: E402  (registers the ops)
from .api import DenseWarmup, DraftOptimizedModule, dense, optimize, report  # noqa: E402
from .backend import draftopt_backend  # noqa: E402
from .config import DraftConfig  # noqa: E402
from .kernels import DraftBlockMask, Geometry, captured_masks, draft_attention  # noqa: E402
from .pictures import save_mask_images  # noqa: E402
from .report import Report  # noqa: E402

__all__ = [
    "DenseWarmup", "DraftBlockMask", "DraftConfig", "DraftOptimizedModule", "Geometry", "Report",
    "captured_masks", "dense", "draft_attention", "draftopt_backend", "kernels", "optimize", "report", "save_mask_images",
]
__version__ = "0.1.0"
