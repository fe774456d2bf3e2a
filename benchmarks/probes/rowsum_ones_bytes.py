"""Which operand of the FP8 row-sum product P @ ones held wrong values: B (ones stored by the threads from a
cast constant, loaded by TMA, or stored from e4m3 ones loaded from memory). One warpgroup, one wgmma, N = 8
and 128, on an sm_90 GPU; prints what the ones buffer holds and the sums' error.

    python benchmarks/probes/rowsum_ones_bytes.py

Under Triton 3.6 the cast constant came out as wrong bytes (docs/design.md, "Attend kernel")."""
import sys

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from draftopt.kernels.gluon._sm90_kernel import _a_operand

_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared


@gluon.jit
def _probe2_kernel(P, P8, ones_desc, Out, Dump, Ones8, N: gl.constexpr, A_SRC: gl.constexpr, B_SRC: gl.constexpr):
    ROWS: gl.constexpr = 64
    BLOCK: gl.constexpr = 128
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, N, 32])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
    blk: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [4, 1], [1, 0])
    rows = gl.arange(0, ROWS, layout=gl.SliceLayout(1, blk))
    cols = gl.arange(0, BLOCK, layout=gl.SliceLayout(0, blk))
    if A_SRC == 0:
        p = gl.load(P + rows[:, None] * BLOCK + cols[None, :])
        a = _a_operand(gl.convert_layout(p, p_layout), True)
    else:
        a = gl.convert_layout(gl.load(P8 + rows[:, None] * BLOCK + cols[None, :]), p_layout)
    ones = gl.allocate_shared_memory(gl.float8e4nv, [N, BLOCK], ones_desc.layout)
    fill: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [4, 1], [1, 0])
    if B_SRC == 0:
        ones.store(gl.full([N, BLOCK], 1.0, gl.float32, fill).to(gl.float8e4nv))
        fence_async_shared()
        gl.thread_barrier()
    elif B_SRC == 2:  # e4m3 ones loaded from memory, stored by the threads
        r8 = gl.arange(0, N, layout=gl.SliceLayout(1, fill))
        c8 = gl.arange(0, BLOCK, layout=gl.SliceLayout(0, fill))
        ones.store(gl.load(Ones8 + r8[:, None] * BLOCK + c8[None, :]))
        fence_async_shared()
        gl.thread_barrier()
    else:
        bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(bar, count=1)
        fence_async_shared()
        mbarrier.expect(bar, ones_desc.block_type.nbytes)
        _tma_load(ones_desc, [0, 0], bar, ones)
        mbarrier.wait(bar, 0)
    acc = gl.zeros([ROWS, N], gl.float32, o_layout)
    acc = warpgroup_mma(a, ones.permute((1, 0)), acc)
    dr = gl.arange(0, N, layout=gl.SliceLayout(1, fill))
    dc = gl.arange(0, BLOCK, layout=gl.SliceLayout(0, fill))
    gl.store(Dump + dr[:, None] * BLOCK + dc[None, :], ones.load(fill).to(gl.float32))
    out_rows = gl.arange(0, ROWS, layout=gl.SliceLayout(1, o_layout))
    out_cols = gl.arange(0, N, layout=gl.SliceLayout(0, o_layout))
    gl.store(Out + out_rows[:, None] * N + out_cols[None, :], acc)


def run(n, a_src, b_src):
    torch.manual_seed(0)
    p = torch.rand(64, 128, device="cuda") * 256
    p8 = p.to(torch.float8_e4m3fn)
    ones = torch.ones(n, 128, device="cuda").to(torch.float8_e4m3fn)
    desc = TensorDescriptor(ones, [n, 128], [128, 1], [n, 128],
                            gl.NVMMASharedLayout.get_default_for([n, 128], gl.float8e4nv))
    out = torch.full((64, n), float("nan"), device="cuda")
    dump = torch.full((n, 128), float("nan"), device="cuda")
    _probe2_kernel[(1,)](p, p8, desc, out, dump, ones, N=n, A_SRC=a_src, B_SRC=b_src, num_warps=4)
    vals, counts = dump.unique(return_counts=True)
    print(f"   B in shared memory after the product: values {vals.tolist()[:6]} x {counts.tolist()[:6]}")
    want = p8.float().sum(1, keepdim=True)
    print(f"N={n:3d} A {'asm cast' if a_src == 0 else 'loaded e4m3'} B {('stored const', 'TMA', 'stored loaded')[b_src]}: "
          f"max rel err {((out - want).abs() / want).max().item():.2e}, out/ref rows 0-2 "
          f"{[round(x, 3) for x in (out[:3, 0] / want[:3, 0]).tolist()]}", flush=True)


if __name__ == "__main__":
    for n in (8, 128):
        for a_src in (1,):
            for b_src in (0, 1, 2):
                try:
                    run(n, a_src, b_src)
                except Exception as e:  # noqa: BLE001
                    print(f"N={n} A{a_src} B{b_src}: {type(e).__name__}: {str(e)[:300]}", flush=True)
