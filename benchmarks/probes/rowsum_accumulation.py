"""FP8 P @ ones as the kernel issues it, then the kernel's rows.

    python benchmarks/probes/rowsum_accumulation.py      # sm_90 GPU, from the repository root

First one warpgroup: A cast by _a_operand's inline PTX in the PV layout (N=128) and converted to the row-sum
layout (N=8), B = 0x38 stored as int8 and bitcast, or ones by TMA; sync and async. Then the Gluon FP8 kernel
with row sums as a product against the additions on 1, 2 and all key blocks: the per-row scale between the
outputs and the residual after it. A running sum in the FP8 accumulator grew that scale with the key blocks
(docs/design.md, "Attend kernel")."""
import sys
from dataclasses import replace

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from draftopt.kernels.gluon._sm90_kernel import _a_operand

_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared


@gluon.jit
def _probe3_kernel(P, ones_desc, Out, Dump, B_SRC: gl.constexpr, CONVERT: gl.constexpr, ASYNC: gl.constexpr):
    ROWS: gl.constexpr = 64
    BLOCK: gl.constexpr = 128
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, 128, 32])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
    l_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, 8, 32])
    pl_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=l_layout, k_width=4)
    blk: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [4, 1], [1, 0])
    rows = gl.arange(0, ROWS, layout=gl.SliceLayout(1, blk))
    cols = gl.arange(0, BLOCK, layout=gl.SliceLayout(0, blk))
    p = gl.load(P + rows[:, None] * BLOCK + cols[None, :])
    ones = gl.allocate_shared_memory(gl.float8e4nv, [8, BLOCK], ones_desc.layout)
    fill: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [4, 1], [1, 0])
    if B_SRC == 0:
        ones.store(gl.full([8, BLOCK], 0x38, gl.int8, fill).to(gl.float8e4nv, bitcast=True))
        fence_async_shared()
        gl.thread_barrier()
    else:
        bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(bar, count=1)
        fence_async_shared()
        mbarrier.expect(bar, ones_desc.block_type.nbytes)
        _tma_load(ones_desc, [0, 0], bar, ones)
        mbarrier.wait(bar, 0)
    if CONVERT:
        a = _a_operand(gl.convert_layout(p, p_layout), True)
        a = gl.convert_layout(a, pl_layout)
    else:
        a = _a_operand(gl.convert_layout(p, pl_layout), True)
    acc = gl.zeros([ROWS, 8], gl.float32, l_layout)
    if ASYNC:
        tok = warpgroup_mma(a, ones.permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(tok,))
    else:
        acc = warpgroup_mma(a, ones.permute((1, 0)), acc)
    dr = gl.arange(0, 8, layout=gl.SliceLayout(1, fill))
    dc = gl.arange(0, BLOCK, layout=gl.SliceLayout(0, fill))
    gl.store(Dump + dr[:, None] * BLOCK + dc[None, :], ones.load(fill).to(gl.float32))
    out_rows = gl.arange(0, ROWS, layout=gl.SliceLayout(1, l_layout))
    out_cols = gl.arange(0, 8, layout=gl.SliceLayout(0, l_layout))
    gl.store(Out + out_rows[:, None] * 8 + out_cols[None, :], acc)


def probe(b_src, convert, asyn):
    torch.manual_seed(0)
    p = torch.rand(64, 128, device="cuda") * 256
    ones = torch.ones(8, 128, device="cuda").to(torch.float8_e4m3fn)
    desc = TensorDescriptor(ones, [8, 128], [128, 1], [8, 128],
                            gl.NVMMASharedLayout.get_default_for([8, 128], gl.float8e4nv))
    out = torch.full((64, 8), float("nan"), device="cuda")
    dump = torch.full((8, 128), float("nan"), device="cuda")
    _probe3_kernel[(1,)](p, desc, out, dump, B_SRC=b_src, CONVERT=convert, ASYNC=asyn, num_warps=4)
    vals, counts = dump.unique(return_counts=True)
    want = p.to(torch.float8_e4m3fn).float().sum(1, keepdim=True)  # keys in any order: the sum is the same
    print(f"B {('bitcast 0x38', 'TMA')[b_src]} convert={convert} async={asyn}: ones {vals.tolist()[:4]} x "
          f"{counts.tolist()[:4]}; max rel err {((out - want).abs() / want).max().item():.2e}; out/ref rows 0-3 "
          f"{[round(x, 3) for x in (out[:4, 0] / want[:4, 0]).tolist()]}", flush=True)


def kernel_rows():
    from draftopt.kernels import unpermute_tiles
    from draftopt.kernels.geometry import Geometry, permuted_source_index
    from draftopt.kernels.gluon import attention as A
    from draftopt.kernels.triton.quantize import fp8_operands_triton
    from draftopt.kernels import permuted_key_bias
    torch.manual_seed(0)
    g = Geometry((2, 16, 32), (8, 16), 0, "end")
    H = 2
    q, k, v = (torch.randn(1, H, g.seq_len, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    n = g.n_tiles
    for label, kv_cnt_val in (("one block", 1), ("two blocks", 2), ("all blocks", n)):
        kv_idx = torch.arange(n, device="cuda", dtype=torch.int32).expand(1, H, n, n).contiguous()
        kv_cnt = torch.full((1, H, n), kv_cnt_val, device="cuda", dtype=torch.int32)
        bias = permuted_key_bias(None, 1, H, g, q.device)
        ops = fp8_operands_triton(q, k, v, permuted_source_index(g, q.device), g.block)
        args = (kv_idx, kv_cnt, bias, 128 ** -0.5, g.n_tiles, g.n_text_blocks, False, q.dtype)
        for pp in (False, True):
            base = replace(A.DEFAULT_FP8_TUNING, pingpong=pp, rowsum_mma=False)
            d = A.attend_sm90_fp8(*ops, *args, base, A.edge_grid(g, False)).float()
            r = A.attend_sm90_fp8(*ops, *args, replace(base, rowsum_mma=True), A.edge_grid(g, False)).float()
            scale = (r * d).sum(-1) / (d * d).sum(-1)  # [1, H, Lp]
            resid = ((r - scale[..., None] * d).norm() / d.norm()).item()
            sc = scale[0, 0, :256].view(-1, 64)
            print(f"kernel {label} pp={pp}: rel err {((r - d).norm() / d.norm()).item():.2e}, residual after a row "
                  f"scale {resid:.2e}; row scale by 64-row half (first 4): min {[round(x, 3) for x in sc.min(1).values.tolist()]}"
                  f" max {[round(x, 3) for x in sc.max(1).values.tolist()]}", flush=True)


if __name__ == "__main__":
    for b in (0, 1):
        for conv in (False, True):
            for asyn in (False, True):
                try:
                    probe(b, conv, asyn)
                except Exception as e:  # noqa: BLE001
                    print(f"B{b} conv{conv} async{asyn}: {type(e).__name__}: {str(e)[:300]}", flush=True)
    kernel_rows()
