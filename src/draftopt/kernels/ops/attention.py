"""Stage 4, sparse-attn: ``draftopt::block_sparse_attention`` and, stages 3-5 fused, ``draftopt::tiled_attention``.

``block_sparse_attention(q, k, v, kv_idx, kv_cnt, key_bias, scale, block,
n_text_blocks, visual_bias, backend)`` takes q, k, v in the padded tile-major
layout [B, heads, Lp, D] (``permute_tiles``), where the first S blocks are
visual tiles and the last ``n_text_blocks`` are text:

- a visual query tile attends to its selected key tiles (``kv_idx[..., :kv_cnt]``)
  and to every text block;
- a text query block attends to every block;
- ``key_bias`` [B or 1, heads or 1, Lp] float32 is added to every score of a key
  (key_bias.py); ``visual_bias=False`` promises it is 0 on visual key tiles.

``tiled_attention(q, k, v, kv_idx, kv_cnt, key_bias, scale, T, H, W, th, tw,
text_len, text_before, visual_bias, backend)`` computes the same on q, k, v in
the original token order, with no permuted copies where the backend's kernel
reads tiles in place. It knows the grid, so its ``visual_bias`` means less:
whether ``key_bias`` may be nonzero on the grid's real keys (a key padding
mask); the padding keys of edge tiles are masked whatever it says (by the bias,
or where the kernel reads tiles in place, by their position in the tile).

``backend`` ("torch", "triton" or "gluon_sm90") is the kernel that runs, as
``dispatch.plan`` chose it; the Python wrappers plan it when not given. The
last argument, ``fp8`` (default False), computes in FP8 (e4m3 q, k, P, V, the
copies made by ``ops/quantize.py``): on "gluon_sm90", or simulated by "torch";
"triton" refuses it.
"""

from __future__ import annotations

import torch
from torch.library import triton_op

from .._utils import check_dtype, make_inference_only, refuse_grad
from ..block_mask import indices_to_dense
from ..dispatch import Backend, check_backend, check_precision, plan, require_precision
from ..geometry import Geometry, original_to_permuted_index, permuted_source_index
from ..gluon._sm90_kernel import FP8_P_SCALE
from ..gluon.attention import BLOCK as SM90_BLOCK
from ..gluon.attention import edge_grid, reads_in_place
from ..triton.attention import block_sparse_attention_triton, tiled_attention_triton
from ..triton.gather import gather_rows_triton
from ..triton.quantize import fp8_operands_triton
from .key_bias import needs_visual_bias, permuted_key_bias
from .permute import gather_rows_reference
from .quantize import dequantized, fp8_operands_reference


def block_sparse_attention_reference(q, k, v, kv_idx, kv_cnt, key_bias, scale, block, n_text_blocks,
                                     fp8_p: bool = False):
    """Dense attention with the block mask expanded to tokens (float32, float64 for float64 input).

    ``fp8_p``: round the softmax's numerators to e4m3 (times 256) before the PV product and sum the rounded
    values, as the FP8 kernel does (its row sums are a product of the e4m3 P with ones)."""
    B, H, Lp, _ = q.shape
    S = kv_idx.shape[2]
    nb = S + n_text_blocks
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    blocks = torch.ones(B, H, nb, nb, dtype=torch.bool, device=q.device)
    blocks[..., :S, :S] = indices_to_dense(kv_idx, kv_cnt)
    allowed = blocks.repeat_interleave(block, dim=2).repeat_interleave(block, dim=3)
    scores = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * scale + key_bias.to(acc)[..., None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    if fp8_p:
        e = torch.exp(scores - scores.amax(-1, keepdim=True))
        p8 = (e * FP8_P_SCALE).to(torch.float8_e4m3fn).to(acc)
        p = p8 / p8.sum(-1, keepdim=True)
    else:
        p = torch.softmax(scores, dim=-1)
    # A row whose keys are all masked gives zeros, as the kernels do; NaN and Inf propagate as in SDPA.
    p = p.masked_fill((scores == float("-inf")).all(-1, keepdim=True), 0.0)
    # Skipped blocks are never read, as in the kernels: a NaN or Inf in v reaches only the entries of the
    # rows whose kept blocks hold it. p is 0 outside `allowed`, and p @ v alone would spread 0 * NaN to
    # every row. No data-dependent branch: this also runs traced (torch.compile) and on CUDA.
    v = v.to(acc)
    finite = v.isfinite()
    hit = allowed.to(acc) @ finite.logical_not().to(acc)  # kept keys whose v is NaN / Inf, per (row, d)
    out = torch.where(hit > 0, p @ v, p @ torch.where(finite, v, 0.0))
    return out.to(q.dtype)


def block_sparse_attention_fp8_reference(q, k, v, kv_idx, kv_cnt, key_bias, scale, block, n_text_blocks,
                                         src: torch.Tensor | None = None):
    """FP8 attention as the Hopper kernel computes it: q, k, v quantized (``ops/quantize.py``, from the rows
    ``src`` of q, k, v; default: they are tile-major already), P rounded to e4m3; output in q's dtype."""
    if src is None:
        src = torch.arange(q.shape[2], device=q.device)
    operands = fp8_operands_reference(q, k, v, src, block)
    qd, kd, vd = dequantized(*operands, block)
    out = block_sparse_attention_reference(qd, kd, vd, kv_idx, kv_cnt, key_bias, scale, block, n_text_blocks, True)
    return out.to(q.dtype)


def tiled_attention_reference(q, k, v, kv_idx, kv_cnt, key_bias, scale, geom: Geometry, fp8: bool = False):
    """The unfused stages: permute, block-sparse attention, unpermute (output with q's strides)."""
    src = permuted_source_index(geom, q.device)
    if fp8:
        out_p = block_sparse_attention_fp8_reference(q, k, v, kv_idx, kv_cnt, key_bias, scale, geom.block,
                                                     geom.n_text_blocks, src)
    else:
        qp, kp, vp = (gather_rows_reference(t, src) for t in (q, k, v))
        out_p = block_sparse_attention_reference(qp, kp, vp, kv_idx, kv_cnt, key_bias, scale, geom.block,
                                                 geom.n_text_blocks)
    out = torch.empty_like(q)
    out.copy_(gather_rows_reference(out_p, original_to_permuted_index(geom, q.device)))
    return out


def _attend_sm90_fp8(q, k, v, src, kv_idx, kv_cnt, key_bias, scale, n_tiles, n_text_blocks, visual_bias,
                     edges=()):
    """The Gluon FP8 kernel on e4m3 tile-major copies of the rows ``src`` of q, k, v (tile-major output)."""
    operands = fp8_operands_triton(q, k, v, src, SM90_BLOCK)
    return torch.ops.draftopt.attend_sm90_fp8(*operands, kv_idx, kv_cnt, key_bias, scale, n_tiles, n_text_blocks,
                                              visual_bias, q.dtype, list(edges))


def _tiled_attention_sm90(q, k, v, kv_idx, kv_cnt, key_bias, scale, geom: Geometry, visual_bias, fp8):
    """The Gluon kernel on original-order tensors: in place where it can, else on permuted copies. FP8 reads
    e4m3 copies (made in the same pass as the permute) and, where bf16 would read in place, stores its output
    in place (no unpermute: 0.43 ms at HunyuanVideo 720p). Without a key mask, edge tiles' padding is masked
    by its position either way (``edge_grid``), so visual keys read no bias."""
    edges = edge_grid(geom, visual_bias) or ()
    if fp8 and reads_in_place(geom, q.shape[0]):
        operands = fp8_operands_triton(q, k, v, permuted_source_index(geom, q.device), SM90_BLOCK)
        return torch.ops.draftopt.attend_sm90_fp8_in_place(*operands, kv_idx, kv_cnt, key_bias, scale, visual_bias,
                                                           q.dtype, list(edges), *geom.op_args())
    if fp8:
        out_p = _attend_sm90_fp8(q, k, v, permuted_source_index(geom, q.device), kv_idx, kv_cnt, key_bias, scale,
                                 geom.n_tiles, geom.n_text_blocks, visual_bias, edges)
        return gather_rows_triton(out_p, original_to_permuted_index(geom, q.device), out=torch.empty_like(q))
    if reads_in_place(geom, q.shape[0]):
        return torch.ops.draftopt.attend_sm90_in_place(q, k, v, kv_idx, kv_cnt, key_bias, scale, *geom.op_args(),
                                                       visual_bias)
    src = permuted_source_index(geom, q.device)
    qp, kp, vp = (gather_rows_triton(t, src) for t in (q, k, v))
    out_p = torch.ops.draftopt.attend_sm90(qp, kp, vp, kv_idx, kv_cnt, key_bias, scale, geom.n_tiles,
                                           geom.n_text_blocks, visual_bias, list(edges))
    return gather_rows_triton(out_p, original_to_permuted_index(geom, q.device), out=torch.empty_like(q))


@triton_op("draftopt::block_sparse_attention", mutates_args=())
def _block_sparse_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_idx: torch.Tensor, kv_cnt: torch.Tensor,
    key_bias: torch.Tensor, scale: float, block: int, n_text_blocks: int, visual_bias: bool, backend: str,
    fp8: bool = False,
) -> torch.Tensor:
    chosen = check_backend(backend, q, block, fp8)
    if chosen is Backend.GLUON_SM90 and fp8:
        return _attend_sm90_fp8(q, k, v, torch.arange(q.shape[2], device=q.device), kv_idx, kv_cnt, key_bias,
                                scale, kv_idx.shape[2], n_text_blocks, visual_bias)
    if chosen is Backend.GLUON_SM90:
        return torch.ops.draftopt.attend_sm90(q, k, v, kv_idx, kv_cnt, key_bias, scale, kv_idx.shape[2],
                                              n_text_blocks, visual_bias, [])
    if chosen is Backend.TRITON:
        return block_sparse_attention_triton(q, k, v, kv_idx, kv_cnt, key_bias, scale, block, n_text_blocks,
                                             visual_bias)
    if fp8:
        return block_sparse_attention_fp8_reference(q, k, v, kv_idx, kv_cnt, key_bias, scale, block, n_text_blocks)
    return block_sparse_attention_reference(q, k, v, kv_idx, kv_cnt, key_bias, scale, block, n_text_blocks)


@triton_op("draftopt::tiled_attention", mutates_args=())
def _tiled_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_idx: torch.Tensor, kv_cnt: torch.Tensor,
    key_bias: torch.Tensor, scale: float, T: int, H: int, W: int, th: int, tw: int, text_len: int,
    text_before: int, visual_bias: bool, backend: str, fp8: bool = False,
) -> torch.Tensor:
    geom = Geometry.from_op_args(T, H, W, th, tw, text_len, text_before)
    chosen = check_backend(backend, q, geom.block, fp8)
    if chosen is Backend.GLUON_SM90:
        return _tiled_attention_sm90(q, k, v, kv_idx, kv_cnt, key_bias, scale, geom, visual_bias, fp8)
    if chosen is Backend.TRITON:
        return tiled_attention_triton(q, k, v, kv_idx, kv_cnt, key_bias, scale, geom,
                                      needs_visual_bias(visual_bias, geom))
    return tiled_attention_reference(q, k, v, kv_idx, kv_cnt, key_bias, scale, geom, fp8)


make_inference_only(_block_sparse_attention_op, "block_sparse_attention")
make_inference_only(_tiled_attention_op, "tiled_attention")


def _checked_args(name, q, k, v, kv_idx, kv_cnt, geom, key_bias, scale, visual_bias, backend, precision):
    """Shared checks and defaults of the two wrappers: (key_bias, scale, visual_bias, backend, fp8).
    ``visual_bias`` defaults to whether a ``key_bias`` is given, and for the tile-major op also to whether
    edge tiles hold padding (only the tiled op masks that without the bias)."""
    check_precision(precision)
    if not (q.dim() == 4 and q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must share one shape [B, heads, L, D]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, _, D = q.shape
    if tuple(kv_idx.shape[:3]) != (B, H, geom.n_tiles) or tuple(kv_cnt.shape) != (B, H, geom.n_tiles):
        raise ValueError(f"kv_idx {tuple(kv_idx.shape)} / kv_cnt {tuple(kv_cnt.shape)} do not match "
                         f"[B={B}, heads={H}, S={geom.n_tiles}, K] / [B, heads, S]")
    for label, t in (("q", q), ("k", k), ("v", v)):
        check_dtype(label, t)
    refuse_grad(name, q, k, v)
    if visual_bias is None:
        given = key_bias is not None
        visual_bias = given if name == "tiled_attention" else needs_visual_bias(given, geom)
    if key_bias is None:
        key_bias = permuted_key_bias(None, B, H, geom, q.device)
    fp8 = precision == "fp8"
    if backend is None:
        backend = require_precision(plan(geom, q.dtype, q.device, D, B, precision=precision), precision).backend.value
    return key_bias, D ** -0.5 if scale is None else float(scale), bool(visual_bias), str(backend), fp8


def block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_idx: torch.Tensor, kv_cnt: torch.Tensor,
    geom: Geometry, *, key_bias: torch.Tensor | None = None, scale: float | None = None,
    visual_bias: bool | None = None, backend: str | None = None, precision: str | None = None,
) -> torch.Tensor:
    """Block-sparse attention on tile-major q, k, v [B, heads, Lp, D] (see the module doc).

    ``key_bias`` defaults to 0 for real tokens and -inf for padding rows.
    ``visual_bias``: whether ``key_bias`` may be nonzero on visual key tiles
    (default: True when ``key_bias`` is given, else whether the geometry has
    padding rows in edge tiles). ``backend``: None plans it (``dispatch.plan``).
    ``precision``: None (q's dtype) or "fp8" (e4m3 q, k, P, V; ``ops/quantize.py``).
    """
    if q.dim() == 4 and q.shape[2] != geom.padded_len:
        raise ValueError(f"q has {q.shape[2]} rows; the tile-major layout of {geom} has {geom.padded_len}")
    key_bias, scale, visual_bias, backend, fp8 = _checked_args("block_sparse_attention", q, k, v, kv_idx, kv_cnt,
                                                               geom, key_bias, scale, visual_bias, backend, precision)
    return torch.ops.draftopt.block_sparse_attention(
        q, k, v, kv_idx, kv_cnt, key_bias, scale, geom.block, geom.n_text_blocks, visual_bias, backend, fp8)


def tiled_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_idx: torch.Tensor, kv_cnt: torch.Tensor,
    geom: Geometry, *, key_bias: torch.Tensor | None = None, scale: float | None = None,
    visual_bias: bool | None = None, backend: str | None = None, precision: str | None = None,
) -> torch.Tensor:
    """Stages 3-5 in one op: block-sparse attention on q, k, v in the original token order.

    Same result as ``unpermute_tiles(block_sparse_attention(permute_tiles(q), ...))``;
    the kernel reads each tile's rows where they are (any strides, e.g. SDPA's
    transposed [B, L, heads, D] views) and writes the output rows to their
    original places. ``key_bias`` is in the tile-major layout (``permuted_key_bias``).
    ``visual_bias``: whether ``key_bias`` may be nonzero on the grid's real keys (default:
    whether it is given); edge tiles' padding is masked either way.
    ``precision="fp8"``: e4m3 products (the module doc of ``block_sparse_attention``).

    Example:
        >>> from draftopt.kernels import Geometry, draft_map, select_blocks, tile_pool, tiled_attention
        >>> g = Geometry((2, 16, 16), (8, 16))
        >>> q, k, v = (torch.randn(1, 2, g.seq_len, 64) for _ in range(3))
        >>> kv_idx, kv_cnt = select_blocks(draft_map(tile_pool(q, g), tile_pool(k, g), 0.125), 0.5)
        >>> tiled_attention(q, k, v, kv_idx, kv_cnt, g).shape
        torch.Size([1, 2, 512, 64])
    """
    if q.dim() == 4:
        geom.check_seq_len(q.shape[2], "q")
    key_bias, scale, visual_bias, backend, fp8 = _checked_args("tiled_attention", q, k, v, kv_idx, kv_cnt, geom,
                                                               key_bias, scale, visual_bias, backend, precision)
    return torch.ops.draftopt.tiled_attention(q, k, v, kv_idx, kv_cnt, key_bias, scale, *geom.op_args(),
                                              visual_bias, backend, fp8)
