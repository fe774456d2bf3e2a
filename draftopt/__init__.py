"""draftopt: draft-attention sparse attention for video diffusion transformers.

Importing draftopt registers its torch.library ops (namespace ``draftopt``).
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
from .kernels import DraftBlockMask, Geometry, draft_attention  # noqa: E402

__all__ = ["DraftBlockMask", "Geometry", "draft_attention", "kernels"]
__version__ = "0.1.0"
