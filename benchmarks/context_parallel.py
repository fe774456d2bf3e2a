"""draftopt under diffusers' Ulysses context parallelism: 2 GPUs vs 1, dense vs draftopt.

    NCCL_NVLS_ENABLE=0 python benchmarks/context_parallel.py            # 2 GPUs, NCCL, bf16
    python benchmarks/context_parallel.py --cpu-smoke                    # 2 CPU ranks, gloo, tiny model

A diffusers WanTransformer3DModel with random weights (Wan2.1-1.3B heads and
width, 4 layers; latent 21 x 60 x 104 = 480p, 81 frames). On one GPU:
compiled dense (Inductor) and draftopt at 0.9. Then on each of 2 ranks with
ulysses_degree=2: the same two, timed per rank, and draftopt's output compared
with the one-GPU draftopt output (rel. error) at sparsity 0 and 0.9.
Prints a table last.
"""

from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tabulate import tabulate

import draftopt
from _results import save_table
from _timing import wall_ms

# Never NVLink multicast: on shared hosts it can take every GPU of the host out of service.
for _var, _val in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_var, _val)


def build(cpu: bool):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    if cpu:
        cfg, latent, dtype = dict(num_attention_heads=2, attention_head_dim=16, ffn_dim=64, num_layers=2,
                                  text_dim=32, freq_dim=32, in_channels=4, out_channels=4), (2, 16, 32), torch.float32
    else:
        cfg, latent, dtype = dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=4,
                                  text_dim=4096, freq_dim=256, in_channels=16, out_channels=16), (21, 60, 104), \
            torch.bfloat16
    model = WanTransformer3DModel(patch_size=(1, 2, 2), rope_max_seq_len=1024, **cfg).eval().to(dtype)
    torch.manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, cfg["in_channels"], *latent, dtype=dtype),
                  timestep=torch.tensor([500]), encoder_hidden_states=torch.randn(1, 512, cfg["text_dim"], dtype=dtype),
                  return_dict=False)
    opts = dict(tile=(4, 4), min_tokens=0, compiler="aot_eager") if cpu else {}
    return model, inputs, opts


def to(inputs, device):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def timed(fn, cuda):
    """wall_ms after compiling on every rank: a rank that starts timing while its peer still compiles
    waits in the all-to-all (seen: 94 ms vs 36 ms on the other rank)."""
    fn()
    if dist.is_initialized():
        dist.barrier()
    return wall_ms(fn, cuda, warmup=1)


def run_variants(model, inputs, opts, cuda):
    """{name: (ms, output)} for dense Inductor and draftopt at 0 / 0.9."""
    out = {}
    with torch.no_grad():
        dense = torch.compile(model, dynamic=False)
        y = dense(**inputs)[0]
        out["dense (inductor)"] = (timed(lambda: dense(**inputs), cuda), y.float().cpu())
        for s in (0.0, 0.9):
            torch._dynamo.reset()
            m = draftopt.optimize(model, sparsity=s, **opts)
            y = m(**inputs)[0]
            out[f"draftopt {s}"] = (timed(lambda: m(**inputs), cuda) if s else None, y.float().cpu())
            if s:
                out["report"] = draftopt.report(m)
    return out


def worker(rank, port, cpu, refs, results):
    backend = "gloo" if cpu else "nccl"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        from diffusers import ContextParallelConfig

        device = "cpu" if cpu else f"cuda:{rank}"
        if not cpu:
            torch.cuda.set_device(rank)
        model, inputs, opts = build(cpu)
        model, inputs = model.to(device), to(inputs, device)
        count = torch.accelerator.device_count
        if cpu:
            torch.accelerator.device_count = lambda: 1  # diffusers divides by it; 0 on CPU
        plan = {k: v for k, v in type(model)._cp_plan.items() if k != ""}  # its "" entry hits a logger bug
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2), cp_plan=plan)
        torch.accelerator.device_count = count
        with torch.no_grad():
            model(**inputs)  # the split hook's first call is not traceable
        res = run_variants(model, inputs, opts, not cpu)
        rep = res.pop("report")
        row = {k: ms for k, (ms, _) in res.items()}
        for key in refs:
            y, ref = res[key][1], refs[key]
            row[f"rel err {key}"] = ((y - ref).norm() / ref.norm()).item()
        row["rewritten"] = f"{len(rep.rewritten)} ({', '.join(sorted({s.parallel for s in rep.rewritten}))})"
        results[rank] = row
    finally:
        dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="2 CPU ranks with gloo and a tiny model")
    args = ap.parse_args()
    cpu = args.cpu_smoke
    if not cpu and torch.cuda.device_count() < 2:
        raise SystemExit("needs 2 GPUs (or --cpu-smoke)")
    model, inputs, opts = build(cpu)
    device = "cpu" if cpu else "cuda:0"
    single = run_variants(model.to(device), to(inputs, device), opts, not cpu)
    single.pop("report")
    refs = {k: single[k][1] for k in ("dense (inductor)", "draftopt 0.0", "draftopt 0.9")}
    print(f"1 device: dense {single['dense (inductor)'][0]:.1f} ms, draftopt 0.9 {single['draftopt 0.9'][0]:.1f} ms",
          flush=True)
    del model
    torch._dynamo.reset()
    if not cpu:
        torch.cuda.empty_cache()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(worker, args=(port, cpu, refs, results), nprocs=2)
    name = "CPU smoke (gloo)" if cpu else f"{torch.cuda.get_device_name()} x2 (NCCL)"
    print(f"{name}, torch {torch.__version__}, Wan {'tiny' if cpu else '1.3B-width 4 layers, 480p 81 frames'}")
    rows = [["1 device", f"{single['dense (inductor)'][0]:.1f}", f"{single['draftopt 0.9'][0]:.1f}", "-", "-", "-",
             "-"]]
    for rank in sorted(results):
        r = results[rank]
        rows.append([f"rank {rank} of 2 (ulysses)", f"{r['dense (inductor)']:.1f}", f"{r['draftopt 0.9']:.1f}",
                     f"{r['rel err dense (inductor)']:.1e}", f"{r['rel err draftopt 0.0']:.1e}",
                     f"{r['rel err draftopt 0.9']:.1e}", r["rewritten"]])
    # rel err: this rank's output vs the one-device output of the same variant. Dense Ulysses alone
    # differs from dense on one device by rounding; draftopt's columns should be of that size.
    headers = ["run", "dense ms", "draftopt 0.9 ms", "rel err dense", "rel err draftopt 0", "rel err draftopt 0.9",
               "sites rewritten"]
    save_table("context_parallel", headers, rows, dict(device=name, torch=torch.__version__))
    print(tabulate(rows, headers=headers))


if __name__ == "__main__":
    main()
