"""optimize(), dense() and report(): the public entry points."""

from __future__ import annotations

import contextlib
import functools
import weakref

import torch
from torch import nn

from . import backend as _backend
from .passes import DraftConfig
from .report import Report


class DraftOptimizedModule(nn.Module):
    """A model compiled with the draftopt backend (what ``optimize`` returns).

    Calls go to the compiled sparse model, or, inside ``draftopt.dense(model)``,
    to the same model compiled without the rewrite (one extra graph, compiled
    on first use). Attributes the wrapper does not have are read from the
    original model (``.config``, ``.dtype``, ... for diffusers pipelines).
    """

    def __init__(self, model: nn.Module, config: DraftConfig, fullgraph: bool, mode: str | None):
        super().__init__()
        self._orig_mod = model
        self.draftopt_config = config
        self._draftopt_records = []
        self._draftopt_dense_depth = 0
        self._draftopt_warmups = weakref.WeakSet()  # DenseWarmups still in their dense steps
        self._draftopt_compile = dict(fullgraph=fullgraph, mode=mode)
        # Not submodules (state_dict keeps the original model's keys only).
        self.__dict__["_draftopt_sparse"] = self._compiled(config)
        self.__dict__["_draftopt_dense"] = None

    def _compiled(self, config: DraftConfig):
        backend = functools.partial(_backend.draftopt_backend, options=config,
                                    mode=self._draftopt_compile["mode"], records=self._draftopt_records)
        # Static shapes: each resolution compiles its own graph with its own geometry.
        return torch.compile(self._orig_mod, backend=backend, dynamic=False,
                             fullgraph=self._draftopt_compile["fullgraph"])

    def forward(self, *args, **kwargs):
        if torch.is_grad_enabled() and _wants_grad(self._orig_mod, args, kwargs):
            raise _backend.InferenceOnlyError(_backend.INFERENCE_ONLY)
        if not self._draftopt_dense_depth:
            return _unwrapped(self._draftopt_sparse, args, kwargs)
        if self._draftopt_dense is None:
            self.__dict__["_draftopt_dense"] = self._compiled(self.draftopt_config.replace(enabled=False))
        try:
            return _unwrapped(self._draftopt_dense, args, kwargs)
        except BaseException:  # an interrupted pipeline must not leave its warm-up on (then re-raise)
            for warmup in list(self._draftopt_warmups):
                warmup.close()
            raise

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("_orig_mod"), name)

    def extra_repr(self) -> str:
        c = self.draftopt_config
        return f"sparsity={c.sparsity}, policy={c.policy!r}, latent_shape={c.latent_shape}, tile={c.tile}"


# Errors of draftopt's own that reach the user as they are, not inside Dynamo's BackendCompilerFailed.
_OWN_ERRORS = (ValueError, _backend.DenseSitesError, _backend.InferenceOnlyError)


def _unwrapped(compiled, args, kwargs):
    try:
        return compiled(*args, **kwargs)
    except torch._dynamo.exc.BackendCompilerFailed as e:
        inner = getattr(e, "inner_exception", None)
        if isinstance(inner, _OWN_ERRORS):
            raise inner from None
        raise


def _wants_grad(model: nn.Module, args, kwargs) -> bool:
    tensors = [x for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor)]
    return any(t.requires_grad for t in tensors) or any(p.requires_grad for p in model.parameters())


def optimize(model: nn.Module, latent_shape=None, sparsity: float | None = None, *, fullgraph: bool | None = None,
             mode: str | None = None, config: DraftConfig | None = None, **options) -> DraftOptimizedModule:
    """Compile ``model`` with its video self-attention replaced by draft attention.

    Args:
        model: an nn.Module (e.g. a diffusers WanTransformer3DModel).
        latent_shape: (T, H, W) of the latent the model is called with; None reads
            the grid off the patch embedding of each compiled graph.
        sparsity: fraction of visual tile pairs to skip (default 0.9, or ``config``'s).
        fullgraph: passed to torch.compile (error on graph breaks).
        mode: Inductor mode, e.g. "reduce-overhead" for CUDA graphs.
        config: a DraftConfig; ``options`` (DraftConfig fields) override it.

    Returns:
        A DraftOptimizedModule; it compiles on its first call. Calling optimize on
        it again reconfigures the original model (rewrites never stack), keeping the
        earlier options and changing only those given.

    The model is inference-only: call it under ``torch.no_grad()`` (a call with
    gradients enabled raises one clear error).

    Example:
        >>> model = draftopt.optimize(transformer, latent_shape=(21, 60, 104), sparsity=0.9)
        >>> out = model(**inputs)
        >>> print(draftopt.report(model))
    """
    earlier = None
    if isinstance(model, DraftOptimizedModule):  # reconfigure: the original model, the earlier options
        earlier = model
        model = model._orig_mod
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise ValueError("optimize() got a model already wrapped by torch.compile; pass the original "
                         "module (model._orig_mod) and let draftopt compile it")
    if not isinstance(model, nn.Module):
        raise ValueError(f"optimize() expects an nn.Module, got {type(model).__name__}")
    given = {"sparsity": sparsity, "latent_shape": latent_shape}
    base = config if config is not None or earlier is None else earlier.draftopt_config
    cfg = DraftConfig.from_options(base, **options, **{k: v for k, v in given.items() if v is not None})
    if earlier is not None:
        fullgraph = earlier._draftopt_compile["fullgraph"] if fullgraph is None else fullgraph
        mode = earlier._draftopt_compile["mode"] if mode is None else mode
    return DraftOptimizedModule(model, cfg, bool(fullgraph), mode)


@contextlib.contextmanager
def dense(model: DraftOptimizedModule):
    """Run ``model`` with its original dense attention inside the block.

    The paper (and SVG) run the first denoising steps dense. The dense graph is
    compiled once, on first use; switching back and forth recompiles nothing.

    Example:
        >>> for i, t in enumerate(timesteps):
        ...     with draftopt.dense(transformer) if i < 10 else contextlib.nullcontext():
        ...         noise_pred = transformer(latents, t, text)
    """
    if not isinstance(model, DraftOptimizedModule):
        raise ValueError(f"draftopt.dense() expects a model returned by draftopt.optimize(), got "
                         f"{type(model).__name__}")
    model._draftopt_dense_depth += 1
    try:
        yield model
    finally:
        model._draftopt_dense_depth -= 1


class DenseWarmup:
    """A diffusers ``callback_on_step_end`` that runs the first ``steps`` denoising steps dense.

    The model is dense from construction until step ``steps - 1`` (or the
    pipeline's last step) has run. It goes back to sparse as well when a dense
    call raises (an interrupted pipeline), when the warm-up is closed or used
    as a context manager, and when the object is dropped.

    Example:
        >>> pipe.transformer = draftopt.optimize(pipe.transformer, sparsity=0.9)
        >>> video = pipe(prompt, num_inference_steps=50,
        ...              callback_on_step_end=draftopt.DenseWarmup(pipe.transformer, steps=10)).frames
    """

    def __init__(self, model: DraftOptimizedModule, steps: int):
        if not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be an int >= 0, got {steps!r}")
        if not isinstance(model, DraftOptimizedModule):
            raise ValueError(f"DenseWarmup expects a model returned by draftopt.optimize(), got {type(model).__name__}")
        self.steps = steps
        self._model = model if steps else None
        if self._model is not None:
            model._draftopt_dense_depth += 1
            model._draftopt_warmups.add(self)

    @property
    def active(self) -> bool:
        """Whether the model is still in this warm-up's dense steps."""
        return self._model is not None

    def close(self) -> None:
        """End the warm-up now: the model runs sparse again (idempotent)."""
        model, self._model = self._model, None
        if model is not None:
            model._draftopt_dense_depth -= 1
            model._draftopt_warmups.discard(self)

    def __call__(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        last = getattr(pipe, "num_timesteps", None)  # diffusers pipelines' step count
        if step >= self.steps - 1 or (isinstance(last, int) and step >= last - 1):  # step `step` has just run
            self.close()
        return callback_kwargs

    def __enter__(self) -> "DenseWarmup":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()


def reset() -> None:
    """Forget what the draftopt backend recorded in this process: compiled graphs and captured masks.

    ``draftopt.report()`` (no model) starts empty again; models returned by
    ``optimize`` keep their own records.
    """
    from .kernels.ops.record_mask import captured_masks

    _backend.reset()
    captured_masks(clear=True)


def report(model: nn.Module | None = None) -> Report:
    """What draftopt did: for a model returned by optimize, its graphs; with no
    argument, every graph the draftopt backend compiled in this process."""
    if model is None:
        return Report(_backend.GRAPHS)
    if not isinstance(model, DraftOptimizedModule):
        raise ValueError(f"draftopt.report() expects a model returned by draftopt.optimize() (or no "
                         f"argument for every graph), got {type(model).__name__}")
    return Report(model._draftopt_records)
