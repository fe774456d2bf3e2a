"""Sparsity that changes between denoising steps, without recompiling.

Community workflows run the first steps dense and sparsify later (dense ->
0.5 -> 0.9). A model optimized with ``runtime_sparsity=True`` reads sparsity
and the guard's bound from a device tensor (kernels/control.py); these two
entry points write it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .api import DraftOptimizedModule


def _control(model):
    if not isinstance(model, DraftOptimizedModule):
        raise ValueError(f"expected a model returned by draftopt.optimize(), got {type(model).__name__}")
    if model._draftopt_control is None:
        raise RuntimeError("this model's sparsity is compiled in: optimize it with runtime_sparsity=True to "
                           "change sparsity between calls without recompiling")
    return model._draftopt_control


def set_sparsity(model: DraftOptimizedModule, sparsity: float | None = None, *,
                 max_error: float | None = None) -> None:
    """Set the sparsity (and/or the guard's ``max_error``, 1 = off) the next calls use; no recompile.

    Example:
        >>> model = draftopt.optimize(transformer, latent_shape=(21, 60, 104), runtime_sparsity=True)
        >>> draftopt.set_sparsity(model, 0.5)   # the next calls skip half of the tile pairs
    """
    _control(model).set(sparsity=sparsity, max_error=max_error)


class SparsitySchedule:
    """A diffusers ``callback_on_step_end`` that sets each denoising step's sparsity.

    ``schedule`` is a list (step i uses ``schedule[min(i, len - 1)]``) or a function of the step index.
    Sparsity 0 keeps every tile pair (exact dense attention, run by the sparse kernel). The first
    step's value is set at construction.

    Example:
        >>> pipe.transformer = draftopt.optimize(pipe.transformer, runtime_sparsity=True)
        >>> steps = [0.0] * 5 + [0.5] * 5 + [0.9]          # dense -> 0.5 -> 0.9
        >>> video = pipe(prompt, num_inference_steps=50,
        ...              callback_on_step_end=draftopt.SparsitySchedule(pipe.transformer, steps)).frames
    """

    def __init__(self, model: DraftOptimizedModule, schedule: Sequence[float] | Callable[[int], float]):
        self._control = _control(model)
        if not callable(schedule):
            values = list(schedule)
            if not values:
                raise ValueError("schedule is empty: give at least one sparsity")
            schedule = self._from_list(values)
        self.schedule = schedule
        self.step(0)

    @staticmethod
    def _from_list(values):
        for i, s in enumerate(values):
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s < 1.0:
                raise ValueError(f"schedule[{i}] must be a sparsity in [0, 1), got {s!r}")
        return lambda i: values[min(i, len(values) - 1)]

    def step(self, i: int) -> float:
        """Set step ``i``'s sparsity; returns it."""
        s = self.schedule(i)
        self._control.set(sparsity=s)
        return s

    def __call__(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        self.step(step + 1)  # step `step` has just run
        return callback_kwargs
