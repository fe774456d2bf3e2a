"""draftopt: draft-attention sparse attention for video diffusion transformers.

    model = draftopt.optimize(model, latent_shape=(T, H, W), sparsity=0.9)
    model = torch.compile(model, backend="draftopt")   # the backend, by name
    print(draftopt.report(model))
    handle = draftopt.use_attention_backend(model, sparsity=0.9)   # diffusers models, no graph needed
    draftopt.export_onnx(model, example_args, "model.onnx", sparsity=0.9)   # deploy: one ONNX node per site

Importing draftopt registers its torch.library ops (namespace ``draftopt``)
and nothing else. Layers, imported one way: draftopt (API, backend, report)
-> draftopt.passes (FX rewrite) -> draftopt.kernels (ops and kernels).
"""

from . import kernels  # registers the ops
from .api import DenseWarmup, DraftOptimizedModule, dense, optimize, report, reset, use_attention_backend
from .backend import DenseSitesError, DraftoptWarning, draftopt_backend
from .kernels import DraftBlockMask, Geometry, captured_masks, draft_attention
from .passes import DraftConfig
from .pictures import save_mask_images
from .report import Report
from .schedule import SparsitySchedule, set_sparsity
# torch only: onnx / onnxscript are imported when a file is written (registers draftopt::draft_attention_onnx)
from .export import OnnxExport, add_onnx_functions, export_onnx, export_program, onnx_translation_table

__all__ = [
    "SparsitySchedule", "set_sparsity",
    "DenseSitesError", "DenseWarmup", "DraftBlockMask", "DraftoptWarning", "DraftConfig", "DraftOptimizedModule", "Geometry", "OnnxExport", "Report",
    "add_onnx_functions", "export_onnx", "export_program", "onnx_translation_table",
    "captured_masks", "dense", "draft_attention", "draftopt_backend", "kernels", "optimize", "report", "reset",
    "save_mask_images", "use_attention_backend",
]
__version__ = "0.1.0"
