"""Model level: a Wan2.1-14B-shaped transformer, dense Inductor vs draftopt.

    python benchmarks/model.py [--layers 4] [--sparsity 0.9]
    python benchmarks/model.py --cpu-smoke          # tiny model on the CPU: checks the script runs

diffusers WanTransformer3DModel with Wan2.1-14B dimensions (40 heads x 128,
ffn 13824) but few layers, random weights, bf16, 720p (latent 21 x 90 x 160
-> 21 x 45 x 80 = 75,600 tokens), 512 text tokens. Both sides compiled with
Inductor; draftopt also under CUDA graphs (mode="reduce-overhead"). Prints ms
per forward and the speedup, a table last.
"""

from __future__ import annotations

import argparse

import torch
from tabulate import tabulate

import draftopt
from _results import save_table
from _timing import wall_ms


def build(layers: int, cpu: bool):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    if cpu:
        dims = dict(num_attention_heads=2, attention_head_dim=16, ffn_dim=64, text_dim=32, freq_dim=32,
                    in_channels=4, out_channels=4)
        latent, device, dtype = (2, 16, 32), "cpu", torch.float32
    else:
        dims = dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, text_dim=4096, freq_dim=256,
                    in_channels=16, out_channels=16)
        latent, device, dtype = (21, 90, 160), "cuda", torch.bfloat16
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_layers=layers, rope_max_seq_len=1024, **dims)
    model = model.eval().to(device, dtype)
    inputs = dict(hidden_states=torch.randn(1, dims["in_channels"], *latent, device=device, dtype=dtype),
                  timestep=torch.tensor([500], device=device),
                  encoder_hidden_states=torch.randn(1, 512, dims["text_dim"], device=device, dtype=dtype),
                  return_dict=False)
    return model, inputs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--cpu-smoke", action="store_true")
    args = ap.parse_args()
    cpu = args.cpu_smoke
    model, inputs = build(args.layers, cpu)
    opts = dict(tile=(4, 4), min_tokens=0, compiler="aot_eager") if cpu else {}
    rows = []
    with torch.no_grad():
        dense = torch.compile(model, dynamic=False)
        t_dense = wall_ms(lambda: dense(**inputs), not cpu, args.iters)
        rows.append(["dense (inductor)", f"{t_dense:.1f}", "1.00x"])
        variants = [("draftopt", {})] + ([] if cpu else [("draftopt + CUDA graphs", {"mode": "reduce-overhead"})])
        for name, extra in variants:
            torch._dynamo.reset()
            sparse = draftopt.optimize(model, sparsity=args.sparsity, **opts, **extra)
            t = wall_ms(lambda: sparse(**inputs), not cpu, args.iters)
            rows.append([f"{name} {args.sparsity}", f"{t:.1f}", f"{t_dense / t:.2f}x"])
        rep = draftopt.report(sparse)
    device = "CPU smoke" if cpu else torch.cuda.get_device_name()
    print(f"{device}, torch {torch.__version__}; Wan {'tiny' if cpu else '14B dims'}, {args.layers} layers, "
          f"{len(rep.rewritten)} of {len(rep.sites)} attention sites rewritten")
    headers = ["model", "ms / forward", "speedup"]
    save_table("model", headers, rows, dict(device=device, torch=torch.__version__, layers=args.layers,
                                            sparsity=args.sparsity, rewritten=len(rep.rewritten),
                                            sites=len(rep.sites)))
    print(tabulate(rows, headers=headers))


if __name__ == "__main__":
    main()
