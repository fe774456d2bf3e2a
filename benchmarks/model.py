"""Model level: a Wan2.1-14B-shaped transformer, dense Inductor vs draftopt, with bf16 or FP8 linears.

    python benchmarks/model.py [--layers 4] [--sparsity 0.9] [--rows dense draftopt] [--fp8-attention]
                               [--tile auto|strips|8x16]
    python benchmarks/model.py --cpu-smoke          # tiny model on the CPU: checks the script runs

diffusers WanTransformer3DModel with Wan2.1-14B dimensions (40 heads x 128,
ffn 13824) but few layers, random weights, bf16, 720p (latent 21 x 90 x 160
-> 21 x 45 x 80 = 75,600 tokens), 512 text tokens. One model and one set of
inputs for every row; each row compiles it afresh (Inductor, dynamic=False):

    dense          torch.compile(model), bf16
    dense+fp8      the same after torchao's quantize_(model, Float8DynamicActivationFloat8WeightConfig(
                   granularity=PerRow())): each nn.Linear (all of Wan's have dims divisible by 16, which
                   torchao needs) in FP8 e4m3, weights and activations with per-row scales, activations
                   quantized on the fly; set_inductor_config=False, so all rows share one Inductor config
    draftopt       draftopt.optimize(model, sparsity=...) on the bf16 model
    draftopt+fp8   quantize_ as dense+fp8, then draftopt.optimize
    draftopt+cuda-graphs         opt-in: draftopt with mode="reduce-overhead" (at model level CUDA
                                 graphs changed nothing measurable: docs/design.md)
    draftopt+fp8+fp8-attention   --fp8-attention: draftopt+fp8 with precision="fp8" passed to
                                 draftopt.optimize; skipped, with a note, where it has no such option

``--rows`` picks rows (default the first four, in that order). ``--tile`` is draftopt's
``tile`` option (default the package's "auto": raster strips at these 45 x 80 frames at 0.9;
"8x16" for tiles). Quantized rows
quantize a deep copy (quantize_ works in place), so the bf16 rows keep the bf16
weights; each row's graphs and copy are freed before the next. Prints each row as
it is timed and a table last: ms per forward (wall clock, mean of --iters after 2
warm-ups), the speedup over the table's first row, the linears' precision, the
attention sites draftopt rewrote. save_table appends the rows to
benchmarks/results/model.jsonl (JSON and CSV of the run to $OUT or '.').

The quantized rows need torchao (an optional extra, in ``.[test]``; imported only
when such a row runs: on the GPU machine install its wheel). ``--cpu-smoke``: the
tiny model in float32, draftopt under aot_eager; float8 matmuls need a GPU, so
the quantized rows use torchao's Int8DynamicActivationInt8WeightConfig there
("int8 linears (CPU smoke)"), the same code path; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import gc

import torch
from tabulate import tabulate

import draftopt
from _results import save_table
from _timing import wall_ms

# row -> (quantized linears, draftopt.optimize options; None: dense torch.compile)
ROWS = {
    "dense": (False, None),
    "dense+fp8": (True, None),
    "draftopt": (False, {}),
    "draftopt+fp8": (True, {}),
    "draftopt+cuda-graphs": (False, {"mode": "reduce-overhead"}),
    "draftopt+fp8+fp8-attention": (True, {"precision": "fp8"}),
}
DEFAULT_ROWS = ["dense", "dense+fp8", "draftopt", "draftopt+fp8"]
HEADERS = ["model", "linears", "ms / forward", "speedup", "sites rewritten"]


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


def quantize(model, cpu: bool) -> str:
    """Quantize model's nn.Linear layers in place with torchao; returns the linears' label."""
    from torchao.quantization import quantize_

    # set_inductor_config=False: torchao would switch on coordinate-descent tuning process-wide, and every
    # later row, bf16 ones too, would compile with it: the rows would not share one Inductor config.
    if cpu:  # float8 matmuls need a GPU; int8 takes the same quantize_ path on the CPU
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig

        quantize_(model, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
        return "int8 (CPU smoke)"
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False))
    return "fp8 e4m3, per-row"


def run_row(name: str, base, inputs, args, opts: dict):
    """(label, linears, ms, report or None) of one row; None where this draftopt lacks the row's option."""
    cpu = args.cpu_smoke
    quantized, draft = ROWS[name]
    model = copy.deepcopy(base) if quantized else base
    linears = quantize(model, cpu) if quantized else "fp32 (CPU smoke)" if cpu else "bf16"
    label = "dense (inductor)" if draft is None else f"draftopt {args.sparsity}"
    if quantized:
        label += " + int8 linears (CPU smoke)" if cpu else " + fp8 linears"
    if draft and "precision" in draft:
        label += " + fp8 attention"
    if draft and "mode" in draft:
        label += " + CUDA graphs"
    if draft is None:
        compiled = torch.compile(model, dynamic=False)
    else:
        try:
            compiled = draftopt.optimize(model, sparsity=args.sparsity, **opts, **draft)
        except (TypeError, ValueError) as e:  # a DraftConfig without the field raises ValueError, unknown option
            if "precision" not in draft or "precision" not in str(e):
                raise
            print(f"note: skipping {name}: this draftopt.optimize does not take precision='fp8' ({e})")
            return None
    ms = wall_ms(lambda: compiled(**inputs), not cpu, args.iters)
    return label, linears, ms, None if draft is None else draftopt.report(compiled)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--rows", nargs="+", choices=list(ROWS), default=DEFAULT_ROWS, metavar="ROW",
                    help=f"of {', '.join(ROWS)} (default: %(default)s)")
    ap.add_argument("--fp8-attention", action="store_true", help="add draftopt+fp8+fp8-attention")
    ap.add_argument("--tile", choices=["auto", "strips", "8x16"],
                    help="draftopt's tile option (default: the package's, 'auto')")
    ap.add_argument("--cpu-smoke", action="store_true")
    args = ap.parse_args(argv)
    cpu = args.cpu_smoke
    names = list(dict.fromkeys(args.rows + (["draftopt+fp8+fp8-attention"] if args.fp8_attention else [])))
    base, inputs = build(args.layers, cpu)
    opts = dict(tile=(4, 4), min_tokens=0, compiler="aot_eager") if cpu else {}
    if args.tile:
        opts["tile"] = (8, 16) if args.tile == "8x16" else args.tile
    rows, rep, t_first = [], None, None
    with torch.no_grad():
        for name in names:
            torch._dynamo.reset()
            out = run_row(name, base, inputs, args, opts)
            # The 14B-dims model at 720p is large: free this row's graphs (they hold its quantized copy) first.
            torch._dynamo.reset()
            gc.collect()
            if not cpu:
                torch.cuda.empty_cache()
            if out is None:
                continue
            label, linears, t, row_rep = out
            t_first = t_first or t
            rep = row_rep if rep is None else rep  # the meta's site counts: the first draftopt row's
            # per row: a quantized model's number means little unless its attention was rewritten too
            rewritten = f"{len(row_rep.rewritten)} of {len(row_rep.sites)}" if row_rep else "-"
            rows.append([label, linears, f"{t:.1f}", f"{t_first / t:.2f}x", rewritten])
            print(*rows[-1], sep="  |  ", flush=True)  # now: a later row's failure keeps this one
    device = "CPU smoke" if cpu else torch.cuda.get_device_name()
    sites = f", {len(rep.rewritten)} of {len(rep.sites)} attention sites rewritten" if rep else ""
    print(f"{device}, torch {torch.__version__}; Wan {'tiny' if cpu else '14B dims'}, {args.layers} layers{sites}")
    meta = dict(device=device, torch=torch.__version__, layers=args.layers, sparsity=args.sparsity, tile=args.tile,
                rewritten=len(rep.rewritten) if rep else None, sites=len(rep.sites) if rep else None)
    if any(ROWS[n][0] for n in names):
        import torchao

        meta["torchao"] = torchao.__version__
    save_table("model", HEADERS, rows, meta)
    print(tabulate(rows, headers=HEADERS, floatfmt=".1f"))
    return rows


if __name__ == "__main__":
    main()
