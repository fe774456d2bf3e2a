"""What the Triton launchers share: launching under torch.compile and the tile order in device code."""

from __future__ import annotations

import triton
import triton.language as tl
from torch.library import wrap_triton
from triton.runtime.jit import JITFunction


def launcher(kernel):
    """``wrap_triton(kernel)``, so torch.compile can see the launch.

    Under ``TRITON_INTERPRET=1`` (the CPU tests) ``triton.jit`` returns an
    interpreted function that ``wrap_triton`` does not accept; it is launched as is.
    """
    return wrap_triton(kernel) if isinstance(kernel, JITFunction) else kernel


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(n)


@triton.jit
def tile_coords(s, nw, nhw):
    """Visual tile ``s`` -> (frame, tile row, tile column): ``geometry.tile_coords`` in device code."""
    return s // nhw, (s % nhw) // nw, s % nw
