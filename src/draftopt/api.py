"""optimize(), dense() and report(): the public entry points."""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import sys
import warnings
import weakref

import torch
from torch import nn

from . import backend as _backend
from .model_info import check_call_latent, history_before_grid, model_patch, repeated_blocks
from .kernels.control import RuntimeControl
from .passes import DraftConfig, ModelContext
from .report import Report

log = logging.getLogger(__name__)


# Compiled graphs each mode (sparse, dense) of one optimized model may keep: resolutions x batch sizes.
# Dynamo's own limit (torch._dynamo.config.recompile_limit, 8) counts every torch.compile of one code object
# together: the dense and the sparse graphs of a model, and other models of the same class.
RECOMPILE_LIMIT = 64
# torch >= 2.13: a torch.compile call can keep its own cache entries, under its own limit.
_OWN_CACHE = "isolate_recompiles" in inspect.signature(torch.compile).parameters


class DraftOptimizedModule(torch._dynamo.eval_frame.OptimizedModule):
    """A model compiled with the draftopt backend (what ``optimize`` returns).

    Calls go to the compiled sparse model, or, inside ``draftopt.dense(model)``,
    to the same model compiled without the rewrite (one extra graph, compiled
    on first use). With ``regional=True`` only the model's repeated blocks are
    compiled (as diffusers' ``compile_repeated_blocks`` does), for the duration
    of each call. Attributes the wrapper does not have are read from the
    original model (``.config``, ``.dtype``, ``.save_pretrained``, ... for diffusers pipelines).

    To other libraries it is what ``torch.compile(model)`` returns, an ``OptimizedModule`` whose original
    model is ``_orig_mod``: that is how diffusers (``DiffusionPipeline.register_modules``, ``save_pretrained``,
    ``from_pretrained(..., transformer=...)``), accelerate and torch.distributed.checkpoint find the model
    behind a compiled one, so ``pipe.transformer = draftopt.optimize(pipe.transformer)`` keeps the pipeline's
    ``model_index.json`` entry and ``pipe.save_pretrained`` writes the original model's config and weights.
    ``state_dict()`` holds the original model's tensors under ``_orig_mod.``, as torch.compile's does.
    Otherwise it behaves as a plain nn.Module: the overrides below undo OptimizedModule's own behaviour
    (attribute writes that go to the original model, its ``training`` mirror, pickling through a Dynamo
    context, ``bool()`` through ``len()``).
    """

    __call__ = nn.Module.__call__
    __setattr__ = nn.Module.__setattr__
    __delattr__ = nn.Module.__delattr__
    __getstate__ = nn.Module.__getstate__
    __setstate__ = nn.Module.__setstate__
    __reduce__ = object.__reduce__
    training = True  # an instance attribute, as in nn.Module (this shadows OptimizedModule's property)

    def __bool__(self) -> bool:
        return True

    def __init__(self, model: nn.Module, config: DraftConfig, fullgraph: bool, mode: str | None,
                 regional: bool = False):
        nn.Module.__init__(self)  # not OptimizedModule's: it compiles with a Dynamo context of its own
        self._orig_mod = model
        self.draftopt_config = config
        self._draftopt_records = []
        self._draftopt_dense_depth = 0
        self._draftopt_warmups = weakref.WeakSet()  # DenseWarmups still in their dense steps
        self._draftopt_checked_sites = False  # whether the first sparse call looked for video attention sites
        self._draftopt_compile = dict(fullgraph=fullgraph, mode=mode, regional=regional,
                                      recompile_limit=max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT))
        self._draftopt_model_patch = model_patch(model)
        # runtime_sparsity: the device tensor the selection reads (draftopt.set_sparsity writes it)
        self.__dict__["_draftopt_control"] = (RuntimeControl(config.sparsity, config.max_error)
                                             if config.runtime_sparsity else None)
        # Not submodules (state_dict keeps the original model's keys only).
        self.__dict__["_draftopt_blocks"] = repeated_blocks(model) if regional else None
        self.__dict__["_draftopt_sparse"] = self._compiled(config)
        self.__dict__["_draftopt_dense"] = None

    def _compiled(self, config: DraftConfig):
        opts = self._draftopt_compile
        backend = functools.partial(_backend.draftopt_backend, options=config, mode=opts["mode"],
                                    records=self._draftopt_records, context=self._draftopt_context(config))
        # Its own cache entries per mode: dense warm-ups do not use up the sparse graphs' limit.
        own = dict(isolate_recompiles=True, recompile_limit=opts["recompile_limit"]) if _OWN_CACHE else {}
        # Static shapes: each resolution compiles its own graph with its own geometry.
        target = _call_block if opts["regional"] else self._orig_mod
        return torch.compile(target, backend=backend, dynamic=False, fullgraph=opts["fullgraph"], **own)

    def _draftopt_context(self, config: DraftConfig) -> ModelContext:
        control = self._draftopt_control
        key = control.key if control is not None and config.enabled else -1
        return ModelContext(patch=self._draftopt_model_patch, control_key=key,
                            history_first=history_before_grid(self._orig_mod))

    def forward(self, *args, **kwargs):
        if torch.is_grad_enabled() and _wants_grad(self._orig_mod, args, kwargs):
            raise _backend.InferenceOnlyError(_backend.INFERENCE_ONLY)
        if not self._draftopt_dense_depth:
            return self._call(self._draftopt_sparse, "sparse", args, kwargs)
        if self._draftopt_dense is None:
            self.__dict__["_draftopt_dense"] = self._compiled(self.draftopt_config.replace(enabled=False))
        try:
            return self._call(self._draftopt_dense, "dense", args, kwargs)
        except BaseException:  # an interrupted pipeline must not leave its warm-up on (then re-raise)
            for warmup in list(self._draftopt_warmups):
                warmup.close()
            raise

    def _call(self, compiled, which: str, args, kwargs):
        out = self._call_compiled(compiled, which, args, kwargs)
        if which == "sparse" and not self._draftopt_checked_sites:
            self.__dict__["_draftopt_checked_sites"] = True
            _warn_if_attention_ran_eagerly(self._orig_mod, self._draftopt_records)
        return out

    def _call_compiled(self, compiled, which: str, args, kwargs):
        limit = self._draftopt_compile["recompile_limit"]
        scoped = contextlib.nullcontext() if _OWN_CACHE else torch._dynamo.config.patch(recompile_limit=limit)
        with scoped, _warn_on_recompile_limit(type(self._orig_mod).__name__, which, limit):
            # A latent_shape that no graph can check (Linear patch embeddings, regional blocks) would give a
            # call at another resolution latent_shape's grid: the call's latent is checked here, on the host.
            if self.draftopt_config.latent_shape is not None:
                check_call_latent(self.draftopt_config.latent_shape, args, kwargs, self._orig_mod,
                                  regional=self._draftopt_blocks is not None)
            if self._draftopt_blocks is None:
                return _unwrapped(compiled, args, kwargs)
            with _blocks_compiled(self._draftopt_blocks, compiled):
                return _unwrapped(self._orig_mod, args, kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("_orig_mod"), name)

    def extra_repr(self) -> str:
        c = self.draftopt_config
        regional = ", regional=True" if self._draftopt_compile["regional"] else ""
        return f"sparsity={c.sparsity}, policy={c.policy!r}, latent_shape={c.latent_shape}, tile={c.tile}{regional}"


def _call_block(self, *args, **kwargs):
    """One repeated block's call: one function, compiled once per mode, shared by every block (one graph
    serves them all; the block's name in the report is its path inside the block, e.g. ``attn1``)."""
    return self._call_impl(*args, **kwargs)


@contextlib.contextmanager
def _blocks_compiled(blocks, compiled):
    """Inside the block each repeated block runs ``compiled`` (how nn.Module.compile does it); after it, as
    before, so the original model is left as it was."""
    saved = [b._compiled_call_impl for b in blocks]
    for b in blocks:
        b._compiled_call_impl = functools.partial(compiled, b)
    try:
        yield
    finally:
        for b, impl in zip(blocks, saved):
            b._compiled_call_impl = impl


class _RecompileLimitHits(logging.Handler):
    """Dynamo's "hit config.recompile_limit" warnings during a call: its only sign that it runs the call
    eagerly, i.e. with the model's own dense attention."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.hits = []

    def emit(self, record):
        if isinstance(record.msg, str) and record.msg.startswith("torch._dynamo hit config."):
            self.hits.append(record.getMessage().splitlines()[0])


@contextlib.contextmanager
def _warn_on_recompile_limit(model_name: str, which: str, limit: int):
    logger = logging.getLogger("torch._dynamo.convert_frame")
    watch = _RecompileLimitHits()
    logger.addHandler(watch)
    try:
        yield
    finally:
        logger.removeHandler(watch)
        if watch.hits:
            warnings.warn(
                f"draftopt: {model_name} ({which} graphs): {watch.hits[0]}: this call and later calls at shapes "
                f"not compiled yet run uncompiled, with dense attention. draftopt keeps {limit} graphs per mode "
                "(resolutions x batch sizes); raise torch._dynamo.config.recompile_limit before "
                "draftopt.optimize to keep more", _backend.DraftoptWarning, stacklevel=4)


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


def _warn_if_attention_ran_eagerly(model: nn.Module, records: list) -> None:
    """Warn when the model has attention modules but no compiled graph holds a video self-attention call:
    Dynamo ran them outside its graphs (graph breaks such as Mochi's torch.nonzero in its processor), where
    no pass sees them, so they stay dense without a site to report."""
    if not records or any(s.candidate for g in records for s in g.sites):
        return
    n = sum(type(m).__name__.endswith("Attention") for m in model.modules())
    if n:
        warnings.warn(
            f"draftopt: {type(model).__name__} has {n} attention modules, but no compiled graph holds a video "
            "self-attention call: Dynamo ran them eagerly (graph breaks, e.g. data-dependent ops such as "
            "torch.nonzero in the attention processor), so its attention stays dense. draftopt.report(model) lists the graphs; "
            "draftopt.use_attention_backend(model) covers processors that call diffusers' dispatch_attention_fn",
            _backend.DraftoptWarning, stacklevel=4)


def optimize(model: nn.Module, latent_shape=None, sparsity: float | None = None, *, fullgraph: bool | None = None,
             mode: str | None = None, regional: bool | None = None, config: DraftConfig | None = None,
             **options) -> DraftOptimizedModule:
    """Compile ``model`` with its video self-attention replaced by draft attention.

    Args:
        model: an nn.Module (e.g. a diffusers WanTransformer3DModel).
        latent_shape: (T, H, W) of the latent the model is called with; None reads
            the grid off the patch embedding of each compiled graph.
        sparsity: fraction of visual tile pairs to skip (default 0.9, or ``config``'s).
        fullgraph: passed to torch.compile (error on graph breaks).
        mode: Inductor mode, e.g. "reduce-overhead" for CUDA graphs.
        regional: compile only the model's repeated blocks (diffusers' ``_repeated_blocks``,
            as ``model.compile_repeated_blocks`` does): one compile serves every block, so
            compiling is much faster. The blocks' graphs do not see the latent: needs
            ``latent_shape``, and each call's latent is checked against it.
        config: a DraftConfig; ``options`` (DraftConfig fields) override it.

    Without ``patch_size``, a graph with no patch convolution (a Linear patch
    embedding, regional blocks) takes the patch size from ``model.config``
    (``patch_size``, ``patch_size_t``); the report says so
    ("patch (1, 2, 2) from model.config").

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
        >>> blocks_only = draftopt.optimize(transformer, latent_shape=(21, 60, 104), regional=True)
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
        regional = earlier._draftopt_compile["regional"] if regional is None else regional
    _check_regional(regional, cfg)
    optimized = DraftOptimizedModule(model, cfg, bool(fullgraph), mode, bool(regional))
    if cfg.patch_size is None and optimized._draftopt_model_patch is not None:
        log.info("draftopt: patch %s from model.config (for graphs without a patch convolution)",
                 optimized._draftopt_model_patch)
    return optimized


def _check_regional(regional, cfg: DraftConfig) -> None:
    if not isinstance(regional, (bool, type(None))):
        raise ValueError(f"regional must be True or False, got {regional!r}")
    if regional and cfg.latent_shape is None:
        raise ValueError("regional=True needs latent_shape=(T, H, W): the repeated blocks' graphs see tokens, "
                         "not the latent, so they cannot read the grid off a patch embedding")
    if regional and cfg.dense_layers:
        raise ValueError(f"dense_layers={cfg.dense_layers} with regional=True: every block runs the one block "
                         "graph, so it would keep that many sites dense in every block; pass dense_layers=0 or "
                         "regional=False")


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
        model, self._model = getattr(self, "_model", None), None  # None too if __init__ refused its arguments
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
    """What draftopt did: for a model returned by optimize, its graphs; for a model prepared with
    ``use_attention_backend``, its attention calls (source "diffusers"); with no argument, every graph the
    draftopt backend compiled and every model the diffusers backend ran in this process."""
    if model is None:
        return Report(_backend.GRAPHS)
    if isinstance(model, DraftOptimizedModule):
        return Report([*model._draftopt_records, *(_attention_backend_records(model._orig_mod) or [])])
    if not isinstance(model, nn.Module):  # draftopt.export_onnx's result, the .onnx file, an export_program program
        from .export import report_of

        exported = report_of(model)
        if exported is None:
            raise ValueError(f"draftopt.report() expects a model returned by draftopt.optimize(), an export "
                             f"(export_onnx's result, the .onnx file it wrote, an export_program program) or no "
                             f"argument, got {type(model).__name__}")
        return exported
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):  # torch.compile of a prepared model
        model = model._orig_mod
    records = _attention_backend_records(model)
    if records is None:
        raise ValueError(f"draftopt.report() expects a model returned by draftopt.optimize() or prepared with "
                         f"draftopt.use_attention_backend() (or no argument for every graph), got "
                         f"{type(model).__name__}")
    return Report(records)


def _attention_backend_records(model: nn.Module):
    """The diffusers backend's records of ``model`` (None: never prepared); without importing diffusers."""
    module = sys.modules.get("draftopt.diffusers_backend")
    handle = module.handle_of(model) if module is not None else None
    return None if handle is None else handle.records


def use_attention_backend(model: nn.Module, sparsity: float | None = None, **options):
    """Draft attention through diffusers' attention dispatcher: ``model``'s video self-attention calls run
    draftopt's ops, eagerly or compiled, with the grid from each call's latent and ``model.config``'s patch
    size. Returns a handle (``.report()``, ``.dense()``, ``.remove()``); ``draftopt.report(model)`` lists the
    calls. For models the FX pass cannot see whole: eager runs, graph breaks, data-dependent sequences.
    Keywords: ``draftopt.diffusers_backend.use_attention_backend`` (DraftConfig fields, ``set_backend``).

    Example:
        >>> handle = draftopt.use_attention_backend(transformer, sparsity=0.9)
        >>> with torch.no_grad():
        ...     out = transformer(**inputs)
        >>> print(draftopt.report(transformer))
    """
    from .diffusers_backend import use_attention_backend as use  # imports diffusers only when called

    return use(model, sparsity, **options)
