"""draftopt as a diffusers attention backend: draft attention for calls that no graph pass sees.

diffusers routes the attention of its model classes through
``diffusers.models.attention_dispatch.dispatch_attention_fn``, which runs the
backend a processor names (``model.set_attention_backend(name)``) or the active
one (``with attention_backend(name):``). This module adds a ``"draftopt"``
backend to that registry, for attention that ``draftopt.optimize``'s FX pass
cannot see: models run eagerly, models whose forward graph-breaks (Dynamo then
runs pieces of it outside any graph), and processors that bypass SDPA.

    handle = draftopt.use_attention_backend(transformer, sparsity=0.9)
    with torch.no_grad():
        out = transformer(**inputs)          # eagerly, or compiled: torch.compile(transformer)
    print(draftopt.report(transformer))      # its sites, source "diffusers"
    handle.remove()                          # the model's own attention backends again

**The geometry.** A backend gets q, k, v and nothing else, so the handle
installs hooks: a forward pre-hook on the model records the shape of the
call's ``hidden_states`` (the latent: T, H, W; channels where the family puts
them, see ``model_info.latent_thw``) for the duration of the call, and a
pre-hook on each attention module its name (for the report). The token grid
is that latent divided by the patch size (``model.config``, or
``patch_size=``); text tokens are the rest of the sequence, placed where the
model family puts them (``model_info.FAMILY_TEXT_POSITION``) or where
``text_position=`` says. The eligibility rules are the pass's
(``DraftAttentionPass._plan``): cross-attention, causal, dropout, grouped-query
attention, a mask that is not a key padding mask, too few tokens
(``min_tokens``) run diffusers' native attention, each with its reason in the
report; a video self-attention call that stays dense warns once per reason
(``DraftoptWarning``; ``strict=True`` raises).

**Under torch.compile, CUDA graphs.** Every decision is made by
``_plan_call`` on constants (shapes, dtypes, names), which Dynamo runs once,
at trace time (``torch.compiler.assume_constant_result``): the compiled graph
holds the draftopt ops and nothing else, no Python decision and no host sync,
so it runs under CUDA graphs (``mode="reduce-overhead"``); each resolution
specializes its own graph. Eagerly the same function runs on every call, a
dictionary lookup after the first. The hot path never calls ``.item()``.

**Registering.** diffusers 0.42.1 has no public way to add an attention
backend: its registry (``_AttentionBackendRegistry``) is keyed by members of
the enum ``AttentionBackendName``, and ``set_attention_backend`` /
``attention_backend()`` accept only names that are members. ``register()``
therefore adds one member, ``AttentionBackendName.DRAFTOPT = "draftopt"``, by
the same three entries ``enum`` itself keeps for each member (the least
invasive way: no diffusers code is patched), then registers the function with
the registry's own decorator (``_AttentionBackendRegistry.register``), as
diffusers registers its backends. It is idempotent.

Not covered: context parallelism (the backend declares no support, so diffusers
refuses the combination; ``draftopt.optimize`` supports Ulysses), query x key
padding masks (HunyuanVideo 1.5: without a graph their form cannot be proven,
and checking their values needs a host sync; ``draftopt.optimize`` recognises
them), processors that call SDPA directly instead of the dispatcher (Mochi,
CogVideoX: ``draftopt.optimize`` sees those).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import operator
import warnings
import weakref
from typing import NamedTuple

import torch
from torch import nn

from . import backend as _backend
from .kernels import check_key_padding_mask, plan
from .kernels._utils import MAX_HEAD_DIM, SUPPORTED_DTYPES
from .model_info import FAMILY_HISTORY_INPUTS, check_latent_shape, latent_thw, model_patch, text_position_of
from .passes import DraftConfig, SiteRecord
from .passes.draft_attention_pass import (SitePlan, StageArgs, check_text_before, site_geometry, stages,
                                          text_len_for)
from .passes.infer_geometry import normalize_patch
from .passes.sites import default_scale
from .report import GraphRecord, Report

log = logging.getLogger(__name__)

BACKEND_NAME = "draftopt"
_MEMBER_NAME = "DRAFTOPT"
SOURCE = "diffusers backend"
# The DraftConfig fields the backend honours; any other one set to a value but its default is refused (an
# option silently ignored would be a silent fallback), with the reason where there is one.
_HONOURED = {"sparsity", "latent_shape", "patch_size", "tile", "policy", "cdf_threshold", "text_len",
             "text_position", "min_tokens", "enabled", "capture_masks", "fuse_permute", "strict", "precision"}
_NOT_OPTIONS = {
    "compiler": "the backend compiles nothing: compile the model yourself (torch.compile) if you want it compiled",
    "dense_layers": "use handle.dense() for dense steps",
}


# -- registration ---------------------------------------------------------------------------------------------
_NATIVE = None  # diffusers' native backend function: what every call that stays dense runs


def register():
    """Make ``"draftopt"`` a diffusers attention backend (idempotent); returns its ``AttentionBackendName``.

    After it, ``model.set_attention_backend("draftopt")`` and ``with attention_backend("draftopt"):`` work;
    calls from a model not prepared with ``use_attention_backend`` (which gives the latent) run diffusers'
    native attention, with one warning.

    Example:
        >>> from diffusers.models.attention_dispatch import attention_backend
        >>> draftopt.diffusers_backend.register()
        <AttentionBackendName.DRAFTOPT: 'draftopt'>
        >>> handle = draftopt.use_attention_backend(transformer, sparsity=0.9, set_backend=False)
        >>> with attention_backend("draftopt"):
        ...     out = transformer(**inputs)
    """
    global _NATIVE
    try:
        from diffusers.models import attention_dispatch as ad
    except ImportError as e:
        raise ImportError(f"draftopt's diffusers backend needs diffusers (>= 0.35): {e}") from None
    names, registry = ad.AttentionBackendName, ad._AttentionBackendRegistry
    if BACKEND_NAME not in names._value2member_map_:
        _add_enum_member(names, _MEMBER_NAME, BACKEND_NAME)
    member = names(BACKEND_NAME)
    _NATIVE = registry._backends[names.NATIVE]
    if registry._backends.get(member) is not _draftopt_attention:
        # No constraints: every check is draftopt's own, and a call that fails one runs native attention.
        registry.register(member, constraints=[], supports_context_parallel=False)(_draftopt_attention)
        log.info("draftopt: registered the %r diffusers attention backend", BACKEND_NAME)
    return member


def _add_enum_member(enum_cls, name: str, value: str) -> None:
    """Add a member to an existing (str) Enum: the entries ``enum`` keeps for each member it creates."""
    member = str.__new__(enum_cls, value)
    member._name_, member._value_ = name, value
    member._sort_order_ = len(enum_cls._member_names_)
    enum_cls._member_names_.append(name)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    type.__setattr__(enum_cls, name, member)  # EnumType.__setattr__ refuses new members


# -- what the hooks tell the backend ---------------------------------------------------------------------------
class _CallState:
    """The model call in progress, as plain values: Dynamo, tracing the hooks and the backend, guards on them by
    value, so a compiled graph is reused for every call with the same latent."""

    def __init__(self):
        self.stack = []  # (handle key, hidden_states shape or None, dense) per prepared model call in progress
        self.site = None  # name of the attention module running now


_STATE = _CallState()
_HANDLES: dict[int, "AttentionBackendHandle"] = {}  # live handles by key
_BY_MODEL = weakref.WeakKeyDictionary()  # model -> its handle
_KEYS = itertools.count(1)
_WARNED_UNPREPARED = False


class _CallPlan(NamedTuple):
    """A call draftopt runs: the five stages' arguments and how to read the mask (constants)."""

    stage: StageArgs
    batch: int
    heads: int
    mask_2d: bool  # diffusers' [B, L] key padding mask, which its native backend reads as [B, 1, 1, L]


class _Skip(Exception):
    def __init__(self, reason: str, facts: dict, candidate: bool = True):
        super().__init__(reason)
        self.facts, self.candidate = facts, candidate


class AttentionBackendHandle:
    """draftopt's attention backend attached to one diffusers model (``use_attention_backend`` returns it).

    ``report()`` lists the model's attention calls (also ``draftopt.report(model)``); ``dense()`` runs the
    model with native attention inside a block (dense warm-up steps); ``remove()`` (or leaving a ``with``
    block) takes the hooks off and gives the attention modules back their earlier backends.

    Example:
        >>> with draftopt.use_attention_backend(transformer, sparsity=0.9) as handle:
        ...     for i, t in enumerate(timesteps):
        ...         with handle.dense() if i < 10 else contextlib.nullcontext():
        ...             noise_pred = transformer(latents, t, text, return_dict=False)[0]
        ...     print(handle.report())
    """

    def __init__(self, model: nn.Module, config: DraftConfig, patch: tuple, patch_how: str):
        self.model_name = type(model).__name__
        self.config = config
        self.patch, self._patch_how = patch, patch_how
        self._family_text_position = text_position_of(model)
        self._in_channels = _config_value(model, "in_channels")
        self.key = next(_KEYS)
        self.records: list[GraphRecord] = []
        self._graphs: dict = {}  # (hidden shape, dense) -> GraphRecord
        self._plans: dict = {}  # _plan_call's arguments -> (_CallPlan or None, the SiteRecord)
        self._warned: set = set()
        self._dense_depth = 0
        self._hooks: list = []
        self._saved: list = []  # (processor, its backend before ours)

    # -- public ------------------------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """Whether the hooks are on (``remove()`` not called yet)."""
        return self.key in _HANDLES

    def report(self) -> Report:
        """The attention calls of this model that went through the backend, one record per latent shape."""
        return Report(self.records)

    @contextlib.contextmanager
    def dense(self):
        """Native attention for the model inside the block (compiled models compile the dense mode once)."""
        self._dense_depth += 1
        try:
            yield self
        finally:
            self._dense_depth -= 1

    def remove(self) -> None:
        """Take the hooks off and restore each attention module's earlier backend (idempotent); the records
        stay (``report()``, ``draftopt.report(model)``)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for processor, before in self._saved:
            processor._attention_backend = before
        self._saved.clear()
        _HANDLES.pop(self.key, None)  # (the model keeps its handle: draftopt.report(model) still lists its calls)

    def __enter__(self) -> "AttentionBackendHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        c = self.config
        state = "active" if self.active else "removed"
        return (f"AttentionBackendHandle({self.model_name}, sparsity={c.sparsity}, policy={c.policy!r}, "
                f"patch={self.patch}, {state})")

    # -- hooks -------------------------------------------------------------------------------------------------
    def _attach(self, model: nn.Module, attention: list, set_backend: bool, member) -> None:
        key, handle = self.key, self
        history_inputs = FAMILY_HISTORY_INPUTS.get(self.model_name, ())

        def enter(module, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None)
            shape = _static(x.shape) if isinstance(x, torch.Tensor) else None
            history = any(isinstance(kwargs.get(name), torch.Tensor) for name in history_inputs)
            _STATE.stack.append((key, shape, handle._dense_depth > 0, history))

        def leave(module, args, kwargs, output):
            _STATE.stack.pop()

        self._hooks.append(model.register_forward_pre_hook(enter, with_kwargs=True))
        self._hooks.append(model.register_forward_hook(leave, with_kwargs=True, always_call=True))
        for name, module in attention:
            self._hooks.append(module.register_forward_pre_hook(_site_entered(name)))
            self._hooks.append(module.register_forward_hook(_site_left, always_call=True))
            if set_backend:
                self._saved.append((module.processor, module.processor._attention_backend))
                module.processor._attention_backend = member
        _HANDLES[key] = self

    # -- planning (at trace time under Dynamo; cached eagerly) -------------------------------------------------
    def _plan(self, *args) -> _CallPlan | None:
        found = self._plans.get(args)
        if found is not None:
            call_plan, record = found
            if call_plan is None and record.candidate and self.config.strict:
                self._tell_dense(record)  # strict: every such call raises, not only the first
            return call_plan
        site, hidden, dense = args[:3]
        try:
            record, call_plan = self._decide(*args)
        except _Skip as why:
            record = SiteRecord(site, "sdpa", reason=str(why), candidate=why.candidate, node="dispatch_attention_fn",
                                **why.facts)
            call_plan = None
        self._plans[args] = (call_plan, record)
        graph = self._graphs.get((hidden, dense))
        if graph is None:
            graph = self._graphs[(hidden, dense)] = GraphRecord(
                index=next(_backend._INDEX), config=dataclasses.asdict(self.config), source=SOURCE,
                code_before=f"# {self.model_name} called with hidden_states {hidden}: attention through "
                            "diffusers' dispatch_attention_fn (no graph)")
            self.records.append(graph)
            _backend.GRAPHS.append(graph)
        graph.sites.append(record)
        if call_plan is None:
            log.info("draftopt: diffusers backend: %s stays dense: %s", site, record.reason)
            if record.candidate:
                self._tell_dense(record)
        else:
            log.info("draftopt: diffusers backend: %s runs draft attention (grid %s, %s)", site, record.grid,
                     record.plan)
            why = _backend.precision_shortfall([record], self.config.precision)
            if why and why not in self._warned:  # once per reason, as the dense warning
                self._warned.add(why)
                warnings.warn(f"draftopt diffusers backend: {self.model_name}: {why}", _backend.DraftoptWarning,
                              stacklevel=3)
        return call_plan

    def _tell_dense(self, record: SiteRecord) -> None:
        """One warning per reason (strict: an error): the model's video self-attention stays dense."""
        if record.reason in self._warned and not self.config.strict:
            return
        self._warned.add(record.reason)
        message = (f"draftopt diffusers backend: video self-attention of {self.model_name} stays dense "
                   f"(native attention): {record.reason} (first at {record.name}). draftopt.report(model) lists "
                   "every call")
        if self.config.strict:
            raise _backend.DenseSitesError(message + " (strict=True)")
        warnings.warn(message, _backend.DraftoptWarning, stacklevel=3)

    def _decide(self, site, hidden, dense, history, q_shape, k_shape, v_shape, dtype, device, mask, dropout_p, is_causal,
                scale, enable_gqa, lse, parallel):
        """(SiteRecord, _CallPlan) of one call, or _Skip: the pass's rules (``DraftAttentionPass._plan``) on
        the shapes diffusers' dispatcher passes (q, k, v [B, L, heads, D])."""
        cfg = self.config
        facts: dict = {}

        def skip(reason: str, candidate: bool = True):
            return _Skip(reason, facts, candidate)

        if len(q_shape) != 4 or len(k_shape) != 4 or len(v_shape) != 4:
            raise skip(f"q/k/v are not [B, L, heads, D] (q is {q_shape})")
        B, L, H, D = q_shape
        facts.update(q_shape=(B, H, L, D), kv_shape=(k_shape[0], k_shape[2], k_shape[1], k_shape[3]),
                     dtype=str(dtype).replace("torch.", ""))
        if parallel:
            raise skip("context parallelism: the diffusers backend runs native attention there; "
                       "draftopt.optimize supports Ulysses")
        if lse:
            raise skip("return_lse=True: draftopt's kernels return no log-sum-exp")
        if is_causal:
            raise skip("causal attention")
        if dropout_p != 0.0:
            raise skip(f"dropout_p={dropout_p}")
        if enable_gqa or k_shape[2] != H:
            raise skip(f"grouped-query attention ({H} query heads, {k_shape[2]} key heads)")
        if k_shape[1] != L or tuple(k_shape) != tuple(v_shape):
            raise skip(f"cross-attention: {L} queries attend to {k_shape[1]} keys", False)
        grid, facts["grid_source"] = self._grid(hidden, facts)
        facts["grid"] = grid
        N = math.prod(grid)
        if N > L:  # text-only attention (a prompt refiner): no candidate
            raise skip(f"sequence length {L} is shorter than the grid {'x'.join(map(str, grid))} = {N} "
                       f"({facts['grid_source']})", False)
        if dtype not in SUPPORTED_DTYPES:
            raise skip(f"dtype {dtype} (supported: float16, bfloat16, float32)")
        if D > MAX_HEAD_DIM:
            raise skip(f"head dim {D} > {MAX_HEAD_DIM}")
        facts["has_mask"] = mask is not None
        mask_2d = False
        if mask is not None:
            shape, mask_dtype = mask
            if mask_dtype != torch.bool and not mask_dtype.is_floating_point:
                raise skip(f"attn_mask dtype {mask_dtype} (bool or additive float masks only)")
            mask_2d = len(shape) == 2 and tuple(shape) == (B, k_shape[1])  # as diffusers' native backend reads it
            try:
                check_key_padding_mask((B, 1, 1, shape[1]) if mask_2d else tuple(shape), B, H, L)
            except ValueError:
                raise skip(f"attn_mask of shape {tuple(shape)} is not a key padding mask (query dimension 1, e.g. "
                           "[B, 1, 1, L]); without a graph its form cannot be proven (draftopt.optimize recognises "
                           "HunyuanVideo 1.5's query x key padding mask in the graph)") from None
            facts["mask_form"] = "key padding"
        text_len = text_len_for(L, grid, cfg.text_len, skip)
        position = "end"
        if history and cfg.text_position == "auto":
            raise skip(f"{self.model_name} called with history latents: they and the text lie on both sides of "
                       "the grid in counts the attention call does not show; draftopt.optimize(model, "
                       "latent_shape=...) reads them off the graph, or pass text_position=<tokens before the grid>")
        if text_len:
            position = cfg.text_position if cfg.text_position != "auto" else self._family_text_position
            if position is None:
                raise skip(f"{text_len} tokens besides the {N}-token grid and no known text position for "
                           f"{self.model_name}: pass text_position='start', 'end' or the number of them before "
                           "the grid to use_attention_backend")
            check_text_before(position, text_len, skip)
        geom = site_geometry(grid, text_len, position, cfg, facts, skip)
        if not cfg.enabled or dense:
            raise skip("dense mode (handle.dense() or enabled=False): native attention", False)
        att = plan(geom, dtype, device, D, B, cfg.fuse_permute, cfg.precision)
        scale = float(scale) if scale is not None else default_scale(D)
        site_plan = SitePlan(geom, scale, att, mask is not None, facts)
        record = SiteRecord.rewritten(site, "sdpa", "dispatch_attention_fn", att, facts)
        return record, _CallPlan(StageArgs.of(site_plan, cfg, site), B, H, mask_2d)

    def _grid(self, hidden, facts) -> tuple[tuple, str]:
        """The call's token grid and where it came from."""
        cfg = self.config
        if cfg.latent_shape is not None:
            if hidden is not None:
                try:
                    check_latent_shape(cfg.latent_shape, hidden)
                except ValueError:
                    raise ValueError(
                        f"latent_shape {cfg.latent_shape} does not match the latent {self.model_name} is called "
                        f"with: hidden_states is {hidden}. Pass this call's (T, H, W) to "
                        "draftopt.use_attention_backend(model, latent_shape=...), or latent_shape=None to read "
                        "it off each call") from None
            thw, how = cfg.latent_shape, f"latent_shape {cfg.latent_shape}"
        elif hidden is None:
            raise _Skip("no hidden_states tensor in the model call: pass latent_shape=(T, H, W)", facts)
        else:
            thw, how = latent_thw(self.model_name, self._in_channels, hidden)
            if thw is None:
                raise _Skip(how, facts)
        if any(d % p for d, p in zip(thw, self.patch)):
            raise _Skip(f"latent {thw} is not divisible by the patch size {self.patch} ({self._patch_how}); "
                        "pass patch_size=(pt, ph, pw)", facts)
        grid = tuple(d // p for d, p in zip(thw, self.patch))
        return grid, f"{how} / patch {self.patch} {self._patch_how}"


def _site_entered(name: str):
    def hook(module, args):
        _STATE.site = name
    return hook


def _site_left(module, args, output):
    _STATE.site = None


def _config_value(model: nn.Module, name: str):
    config = getattr(model, "config", None)
    if config is None:
        return None
    return config.get(name) if hasattr(config, "get") else getattr(config, name, None)


# -- the backend function --------------------------------------------------------------------------------------
@torch.compiler.assume_constant_result
def _plan_call(key, site, hidden, dense, history, q_shape, k_shape, v_shape, dtype, device, mask, dropout_p, is_causal,
               scale, enable_gqa, lse, parallel):
    """The call's _CallPlan, or None for native attention; records the site. Under Dynamo it runs at trace
    time on constants and its result is a constant of the graph."""
    handle = _HANDLES.get(key)
    if handle is None:  # removed while a call was in progress
        return None
    return handle._plan(site or "(no attention module)", hidden, dense, history, q_shape, k_shape, v_shape, dtype, device,
                        mask, dropout_p, is_causal, scale, enable_gqa, lse, parallel)


@torch.compiler.assume_constant_result
def _unprepared_call() -> bool:
    """Warn once per process: the backend was called outside a model prepared with use_attention_backend."""
    global _WARNED_UNPREPARED
    if not _WARNED_UNPREPARED:
        _WARNED_UNPREPARED = True
        warnings.warn(
            "draftopt diffusers backend: an attention call outside a model prepared with "
            "draftopt.use_attention_backend(model, ...) runs diffusers' native attention: the backend needs the "
            "model's latent for the token grid. Call use_attention_backend on the model (it sets the backend "
            "too), or pass it set_backend=False before model.set_attention_backend('draftopt')",
            _backend.DraftoptWarning, stacklevel=3)
    return True


def _draftopt_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    _parallel_config=None,
) -> torch.Tensor:
    """The "draftopt" attention backend: q, k, v [B, L, heads, D] as diffusers' dispatcher passes them; draft
    attention where the call is video self-attention of a prepared model, diffusers' native attention else."""
    native = dict(query=query, key=key, value=value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                  scale=scale, enable_gqa=enable_gqa, return_lse=return_lse, _parallel_config=_parallel_config)
    if not _STATE.stack:
        _unprepared_call()
        return _NATIVE(**native)
    handle_key, hidden, dense, history = _STATE.stack[-1]
    mask = None if attn_mask is None else (_static(attn_mask.shape), attn_mask.dtype)
    call_plan = _plan_call(handle_key, _STATE.site, hidden, dense, history, _static(query.shape), _static(key.shape),
                           _static(value.shape), query.dtype, query.device, mask, dropout_p, is_causal, scale,
                           enable_gqa, return_lse, _parallel_config is not None)
    if call_plan is None:
        return _NATIVE(**native)
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        raise _backend.InferenceOnlyError(_backend.INFERENCE_ONLY)
    q, k, v = (x.permute(0, 2, 1, 3) for x in (query, key, value))  # [B, heads, L, D] views
    if call_plan.mask_2d:
        attn_mask = attn_mask[:, None, None, :]
    out = stages(_run, q, k, v, attn_mask, call_plan.batch, call_plan.heads, query.device, call_plan.stage)
    return out.permute(0, 2, 1, 3)


def _static(shape) -> tuple:
    """A shape as ints. Under Dynamo a dynamic size (torch.compile's default makes a second resolution dynamic)
    becomes its value, guarded: each resolution gets a graph of its own geometry, as with the FX pass.
    (``operator.index`` specializes a SymInt; ``int()`` would keep it symbolic.)"""
    return tuple(operator.index(d) for d in shape)


def _run(op, *args):
    """``stages``' ``call`` for eager use: run the op."""
    return op(*args)


# -- the public entry ------------------------------------------------------------------------------------------
def _attention_modules(model: nn.Module) -> list:
    """(name, module) of each attention module whose processor goes through diffusers' dispatcher (what
    ``set_attention_backend`` sets: processors with an ``_attention_backend`` attribute)."""
    return [(name, m) for name, m in model.named_modules()
            if hasattr(getattr(m, "processor", None), "_attention_backend")]


def use_attention_backend(model: nn.Module, sparsity: float | None = None, *, set_backend: bool = True,
                          config: DraftConfig | None = None, **options) -> AttentionBackendHandle:
    """Run ``model``'s video self-attention as draft attention through diffusers' attention dispatcher.

    Args:
        model: a diffusers model whose attention goes through ``dispatch_attention_fn`` (Wan, HunyuanVideo,
            HunyuanVideo 1.5, LTX-Video, SkyReels-V2, Cosmos, Kandinsky 5, ...), not yet torch.compile'd
            (compile it after this call, if at all).
        sparsity: fraction of visual tile pairs to skip (default 0.9, or ``config``'s).
        set_backend: set the model's attention modules to the "draftopt" backend (and back on ``remove()``);
            only this model: unlike ``model.set_attention_backend``, the process-wide active backend stays as
            it is. False only installs the hooks: then ``model.set_attention_backend("draftopt")`` or
            ``with attention_backend("draftopt"):`` choose when it runs.
        config: a DraftConfig; ``options`` (its fields) override it. ``latent_shape`` (for models called with
            packed tokens), ``patch_size`` (else ``model.config``'s), ``text_position`` (else the model
            family's), ``text_len``, ``tile``, ``policy``, ``min_tokens``, ``fuse_permute``,
            ``capture_masks``, ``strict``, ``enabled``, ``precision``; the others (``compiler``,
            ``dense_layers``, ...) are refused with a ValueError rather than ignored.

    Returns:
        An ``AttentionBackendHandle``: ``.report()``, ``.dense()``, ``.remove()``; a context manager.
        Calling it again on the same model replaces the earlier handle.

    The model is inference-only while attached: a call with gradients raises ``InferenceOnlyError``.

    Example:
        >>> handle = draftopt.use_attention_backend(transformer, sparsity=0.9)
        >>> with torch.no_grad():
        ...     out = transformer(**inputs)
        >>> print(draftopt.report(transformer))
        >>> handle.remove()
    """
    from .api import DraftOptimizedModule

    if isinstance(model, DraftOptimizedModule):
        raise ValueError("use_attention_backend() got a model returned by draftopt.optimize(); pass the original "
                         "model (model._orig_mod): the FX pass and the attention backend are two ways, not layers")
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise ValueError("use_attention_backend() got a model already wrapped by torch.compile; call it on the "
                         "original module first, then torch.compile that module")
    if not isinstance(model, nn.Module):
        raise ValueError(f"use_attention_backend() expects an nn.Module, got {type(model).__name__}")
    if not isinstance(set_backend, bool):
        raise ValueError(f"set_backend must be True or False, got {set_backend!r}")
    overrides = dict(options, **({} if sparsity is None else {"sparsity": sparsity}))
    cfg = DraftConfig.from_options(config, **overrides)
    default = DraftConfig()
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name not in _HONOURED and (f.name in options or value != getattr(default, f.name)):
            why = _NOT_OPTIONS.get(f.name, "the backend does not implement it; draftopt.optimize does")
            raise ValueError(f"{f.name}={value!r} does not apply to the diffusers backend: {why}")
    attention = _attention_modules(model)
    if not attention:
        raise ValueError(f"{type(model).__name__} has no attention module whose processor goes through diffusers' "
                         "dispatch_attention_fn (a processor with `_attention_backend`): the diffusers backend "
                         "cannot reach its attention; use draftopt.optimize(model)")
    if cfg.patch_size is not None:
        patch, how = normalize_patch(cfg.patch_size), "from patch_size"
    else:
        patch, how = model_patch(model), "from model.config"
        if patch is None:
            raise ValueError(f"{type(model).__name__}.config gives no patch size (patch_size / patch_size_t): "
                             "pass patch_size=(pt, ph, pw)")
    member = register()
    earlier = _BY_MODEL.get(model)
    if earlier is not None:
        earlier.remove()
    handle = AttentionBackendHandle(model, cfg, patch, how)
    handle._attach(model, attention, set_backend, member)
    _BY_MODEL[model] = handle
    log.info("draftopt: diffusers backend on %s (%d attention modules, patch %s %s)", type(model).__name__,
             len(attention), patch, how)
    return handle


def handle_of(model: nn.Module) -> AttentionBackendHandle | None:
    """The latest handle of ``model`` (removed or not; None: use_attention_backend was never called on it)."""
    return _BY_MODEL.get(model)
