"""DraftConfig: every knob of the draftopt pass, validated up front."""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass

from ..kernels.dispatch import check_precision
from ..kernels.geometry import TEXT_POSITIONS
from ..kernels.layout import check_tile
from .masks import MASKED_ROW_VALUES
from ..kernels.sparsity import GLOBAL_POLICIES, POLICIES, as_number, check_selection_args

# Sites with fewer visual tokens stay dense: below this the pipeline's fixed
# cost (pool, map, select, permutes) outweighs the attention it skips
# (benchmarks/crossover.py; the crossover table in BENCHMARKS.md).
MIN_TOKENS = 8192
COMPILERS = ("inductor", "aot_eager", "eager")
# "auto": follow q back to the concatenation of text and video tokens.
TEXT_POSITION_CHOICES = ("auto", *TEXT_POSITIONS)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _int_tuple(x) -> tuple | None:
    """A tuple of ints from a sequence of Python / numpy ints; None for anything else."""
    try:
        items = tuple(x)
    except TypeError:
        return None
    return tuple(int(d) for d in items) if items and all(_is_int(d) for d in items) else None


@dataclass(frozen=True)
class DraftConfig:
    """How draftopt rewrites a model's video self-attention.

    Args:
        sparsity: fraction of visual (query tile, key tile) pairs to skip, in [0, 1).
        latent_shape: (T, H, W) of the latent tensor the model is called with;
            None: read the grid off the graph's patch embedding.
        patch_size: patch size (int or (pt, ph, pw)); None: the patch embedding's stride.
        tile: "auto" (the default): per grid, 8 x 16 tiles, or each frame's tokens in raster
            order cut into 128-token strips where those pad fewer rows (45 x 80 tokens: 3.1%
            against 6.7%) and the sparsity is 0 or at least 0.8, fixed (strips select worse
            at lower sparsity; ``draftopt.kernels.layout`` gives the numbers). The report's "tile"
            column shows each site's choice. "strips": strips always; (th, tw): tokens per tile,
            th * tw one kernel block (power of two, 16..256).
        policy: "mass" (each head's pairs of largest estimated attention mass, the default),
            "percentile" (the paper's rule), "topk" or "cdf" (see ``draftopt.kernels.sparsity``).
        cdf_threshold: draft-map mass each query tile must cover (policy "cdf").
        text_len: tokens off the grid per sequence (text, history, conditioning: dense rows and
            columns); None: sequence length minus the grid.
        text_position: "start", "end", the number of those tokens before the grid (the rest after
            it), or "auto": read it off the concatenations that build q's sequence.
        min_tokens: sites with fewer visual tokens stay dense (see MIN_TOKENS).
        dense_layers: the first N eligible sites of each graph stay dense.
        compiler: what compiles the rewritten graph: "inductor", "aot_eager" or "eager".
        enabled: False compiles the graph unchanged (the dense steps of ``draftopt.dense``).
        capture_masks: record every call's block mask (``draftopt.captured_masks()``); for
            inspection and pictures, off by default (no cost when off).
        fuse_permute: one op for stages 3-5 (``draftopt::tiled_attention``: the kernel reads
            each tile of q, k, v in place and writes the output rows back) where that is
            faster, as ``draftopt.kernels.plan`` decides: always on Hopper (the Gluon kernel),
            elsewhere on grids the tiles cover exactly. False always keeps separate
            permute / attention / unpermute ops.
        strict: raise instead of warning when a video self-attention site stays dense
            (a geometry that explains no site, too few tokens, dynamic shapes, ...).
        max_error: the quality guard, in (0, 1): per (batch, head), where the kept pairs hold less
            than ``1 - max_error`` of the map's estimated attention mass, keep more pairs (up to
            dense) until they do. On the device, no host sync. None: off. Policies "mass" and
            "percentile".
        runtime_sparsity: read sparsity and max_error from a device tensor at run time, so
            ``draftopt.set_sparsity`` / ``draftopt.SparsitySchedule`` change them between
            denoising steps without recompiling (``draftopt.optimize`` only; selection by sort:
            slower than the fixed-sparsity radix select, see BENCHMARKS.md).
        masked_rows: what a query row gets that a query x key padding mask (HunyuanVideo 1.5)
            hides entirely. None: what the device's SDPA gives it, found by a probe at compile
            time; where that is not 0, NaN or the mean of v (cuDNN's 16-bit attention leaves such
            rows undefined) the site stays dense, saying so. "zero", "nan", "mean_v": that value,
            whatever SDPA gives: the output of such a row then differs from the original's, which
            is harmless where the rows are padding no valid token reads (HunyuanVideo 1.5: its
            output matches the original, tests/api/test_gpu_coverage.py).
        precision: None (attention computes in the inputs' dtype) or "fp8": e4m3 q, k, P and V on
            Hopper's FP8 tensor cores (q per block, k after removing its mean and v per head scaled
            to e4m3's range; BENCHMARKS.md gives its speed and error). Opt-in: its error is several
            times bf16's. Where the sm_90 kernel cannot run the site (another GPU, head dim, ...) it
            keeps its dtype, the report says why and ``optimize`` warns; on the CPU the PyTorch path
            simulates it.

    Example:
        >>> DraftConfig(sparsity=0.8, policy="topk", tile=(8, 16)).sparsity
        0.8
        >>> DraftConfig(sparsity=1.5)
        Traceback (most recent call last):
        ...
        ValueError: sparsity must be a number in [0, 1), got 1.5
    """

    sparsity: float = 0.9
    latent_shape: tuple | None = None
    patch_size: int | tuple | None = None
    tile: tuple | str = "auto"
    policy: str = "mass"
    cdf_threshold: float = 0.9
    text_len: int | None = None
    text_position: str | int = "auto"
    min_tokens: int = MIN_TOKENS
    dense_layers: int = 0
    compiler: str = "inductor"
    enabled: bool = True
    capture_masks: bool = False
    fuse_permute: bool = True
    strict: bool = False
    max_error: float | None = None
    runtime_sparsity: bool = False
    masked_rows: str | None = None
    precision: str | None = None

    def __post_init__(self):
        # numpy scalars and one-element tensors count as numbers
        sparsity, cdf_threshold = check_selection_args(self.sparsity, self.policy, self.cdf_threshold)
        object.__setattr__(self, "sparsity", sparsity)
        object.__setattr__(self, "cdf_threshold", cdf_threshold)
        if self.latent_shape is not None:
            shape = _int_tuple(self.latent_shape)
            if shape is None or len(shape) != 3 or min(shape) <= 0:
                raise ValueError(f"latent_shape must be three positive ints (T, H, W), got {self.latent_shape!r}")
            object.__setattr__(self, "latent_shape", shape)
        if self.patch_size is not None:
            p = self.patch_size
            shape = _int_tuple((p,) if _is_int(p) else p)
            if shape is None or len(shape) not in (1, 2, 3) or min(shape) <= 0:
                raise ValueError(f"patch_size must be an int or (pt, ph, pw) of positive ints, got {p!r}")
            object.__setattr__(self, "patch_size", shape[0] if len(shape) == 1 else shape)
        self._check_guard()
        for name in ("enabled", "capture_masks", "fuse_permute", "strict", "runtime_sparsity"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        object.__setattr__(self, "tile", check_tile(self.tile))
        if self.text_len is not None and (not _is_int(self.text_len) or self.text_len < 0):
            raise ValueError(f"text_len must be None or an int >= 0, got {self.text_len!r}")
        if not (self.text_position in TEXT_POSITION_CHOICES or (_is_int(self.text_position) and self.text_position >= 0)):
            raise ValueError(f"text_position must be one of {TEXT_POSITION_CHOICES} or a count >= 0 of tokens before "
                             f"the grid, got {self.text_position!r}")
        if self.masked_rows is not None and self.masked_rows not in MASKED_ROW_VALUES:
            raise ValueError(f"masked_rows must be None or one of {MASKED_ROW_VALUES}, got {self.masked_rows!r}")
        for name in ("min_tokens", "dense_layers"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        check_precision(self.precision)
        if self.compiler not in COMPILERS:
            raise ValueError(f"compiler must be one of {COMPILERS}, got {self.compiler!r}")

    def _check_guard(self):
        if self.max_error is not None:
            e = as_number(self.max_error)
            if isinstance(e, bool) or not isinstance(e, (int, float)) or not 0.0 < e < 1.0:
                raise ValueError(f"max_error must be None or a number in (0, 1), got {self.max_error!r}")
            object.__setattr__(self, "max_error", float(e))
        if (self.max_error is not None or self.runtime_sparsity is True) and self.policy not in GLOBAL_POLICIES:
            what = "max_error" if self.max_error is not None else "runtime_sparsity"
            raise ValueError(f"{what} needs a policy that ranks each head's whole map {GLOBAL_POLICIES}, "
                             f"got policy={self.policy!r}")

    @classmethod
    def from_options(cls, options=None, **overrides) -> "DraftConfig":
        """A config from a DraftConfig, a dict of its fields (torch.compile's ``options``) or None."""
        if isinstance(options, DraftConfig):
            base = dataclasses.asdict(options)
        elif options is None:
            base = {}
        elif isinstance(options, dict):
            base = dict(options)
        else:
            raise ValueError(f"options must be a dict of DraftConfig fields or a DraftConfig, got {type(options).__name__}")
        base.update(overrides)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(base) - known)
        if unknown:
            raise ValueError(f"unknown draftopt option(s) {unknown}; DraftConfig fields are {sorted(known)}")
        return cls(**base)

    def replace(self, **changes) -> "DraftConfig":
        return dataclasses.replace(self, **changes)


__all__ = ["COMPILERS", "DraftConfig", "MIN_TOKENS", "POLICIES", "TEXT_POSITION_CHOICES"]
