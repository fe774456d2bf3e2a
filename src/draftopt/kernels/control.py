"""Run-time selection arguments: sparsity and the guard's bound, read on the device.

A compiled graph bakes Python floats in: changing ``sparsity`` would
recompile. With a ``RuntimeControl`` the selection op instead reads a small
device tensor (``[sparsity, max_error]``) that ``set`` overwrites in place, so
a denoising loop can run dense -> 0.5 -> 0.9 over its steps with one compiled
graph, under CUDA graphs too (a replay reads the tensor's current value).

Example:
    >>> ctl = RuntimeControl(sparsity=0.5)
    >>> ctl.set(sparsity=0.9)
    >>> ctl.values(), ctl.tensor("cpu").tolist()
    ((0.9, 1.0), [0.8999999761581421, 1.0])
"""

from __future__ import annotations

import itertools
import weakref

import torch

from .sparsity import as_number

_CONTROLS: "weakref.WeakValueDictionary[int, RuntimeControl]" = weakref.WeakValueDictionary()
_KEYS = itertools.count()


def _check(sparsity, max_error) -> tuple[float, float]:
    sparsity, max_error = as_number(sparsity), as_number(max_error)
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if isinstance(max_error, bool) or not isinstance(max_error, (int, float)) or not 0.0 < max_error <= 1.0:
        raise ValueError(f"max_error must be a number in (0, 1] (1: no guard), got {max_error!r}")
    return float(sparsity), float(max_error)


class RuntimeControl:
    """``[sparsity, max_error]`` for the ops that read them at run time (``key`` names it in a graph)."""

    def __init__(self, sparsity: float = 0.9, max_error: float | None = None):
        self._values = _check(sparsity, 1.0 if max_error is None else max_error)
        self._tensors: dict[torch.device, torch.Tensor] = {}
        self.key = next(_KEYS)
        _CONTROLS[self.key] = self

    def values(self) -> tuple[float, float]:
        return self._values

    def set(self, sparsity: float | None = None, max_error: float | None = None) -> None:
        """Change the values the next calls read (no recompile); None keeps a value."""
        old_s, old_e = self._values
        self._values = _check(old_s if sparsity is None else sparsity, old_e if max_error is None else max_error)
        for t in self._tensors.values():  # in place: graphs (and CUDA graphs) keep reading the same memory
            t.copy_(torch.tensor(self._values, dtype=torch.float32), non_blocking=True)

    def tensor(self, device) -> torch.Tensor:
        """The values on ``device`` (made on the first call, before any CUDA-graph capture)."""
        device = torch.device(device)
        if device not in self._tensors:
            self._tensors[device] = torch.tensor(self._values, dtype=torch.float32, device=device)
        return self._tensors[device]

    def __repr__(self) -> str:
        s, e = self._values
        return f"RuntimeControl(key={self.key}, sparsity={s:g}, max_error={e:g})"


def control(key: int) -> RuntimeControl:
    try:
        return _CONTROLS[key]
    except KeyError:
        raise RuntimeError(f"draftopt: run-time control {key} no longer exists (its model was freed); "
                           "recompile the model") from None
