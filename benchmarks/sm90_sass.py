"""The Gluon kernel compiled for sm_90 on any machine, no GPU: registers, spills and the key loop's instructions.

    python benchmarks/sm90_sass.py [--variants in-place edge strips tile-major fp8] [--sass DIR]
                                   [--tuning rowsum_mma=1 pingpong=0]

Triton compiles a launch for the target its driver names; this script hands it
a stand-in driver that names sm_90 (H100 / H200), so every stage down to the
cubin runs here, with the ptxas Triton ships. Nothing is launched: tensors are
small CPU tensors whose only use is the descriptors' shapes. Per variant it
prints the registers and local-memory spills (cuobjdump -res-usage), the
shared memory, the MUFU.EX2 count, whether ptxas serializes the wgmma
products (its advisory C7514, which Triton does not show), and the
instruction mix of the consumer's key loop (the shortest loop holding both
products and a softmax: one key block a warp, both branches of a runtime
``if`` counted). With ``--sass DIR`` it writes each variant's SASS there;
``--tuning`` overrides Sm90Tuning fields for every variant. A kernel change
can be compiled and read before device time is spent on it (docs/design.md,
"Edge tiles masked by position", found its integer-division chain this way).
Must run without TRITON_INTERPRET.

Variants (the op paths that launch the kernel): ``in-place`` (HunyuanVideo-like
exact grid, text after it), ``edge`` (a padded grid without a key mask: edge
padding masked by position), ``bias`` (the same grid, masked by the bias row,
as with a key mask), ``strips`` (one-row 128-token tiles in place),
``tile-major`` (permuted copies), ``fp8`` (the e4m3 mode), ``fp8-out`` (the e4m3 mode writing its
output in place), ``fp8-edge`` (the e4m3 mode on the padded
grid, its padding masked by position).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

import torch
from tabulate import tabulate

if __package__:
    from . import _results
else:
    import _results

VARIANTS = ("in-place", "edge", "bias", "strips", "tile-major", "fp8", "fp8-edge", "fp8-out")
HEADERS = ["variant", "constexprs", "registers", "spill bytes", "shared KB", "MUFU.EX2", "wgmma serialized",
           "loop instructions", "loop mix"]


class _Sm90Driver:
    """The part of Triton's driver interface a compile without a launch touches, naming sm_90."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", 90, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    @staticmethod
    def is_active():
        return True


def loop_mix(sass: str) -> tuple[int, str]:
    """(instructions, top opcodes) of the consumer's key loop: the shortest backward-branch loop that
    holds both products (HGMMA, or QGMMA for FP8) and a softmax (MUFU.EX2)."""
    ins = [(int(a, 16), op) for a, op in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*?)\s*;", sass)]
    best = None
    for addr, op in ins:
        m = re.search(r"\bBRA\s+(0x[0-9a-f]+)", op)
        if m and int(m.group(1), 16) < addr:
            body = [o for a, o in ins if int(m.group(1), 16) <= a <= addr]
            if any("GMMA" in o for o in body) and any("MUFU.EX2" in o for o in body):  # HGMMA, QGMMA (FP8)
                best = body if best is None or len(body) < len(best) else best
    if best is None:
        return 0, "-"
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", o).split()[0].split(".")[0] for o in best)
    return len(best), ", ".join(f"{k} {v}" for k, v in ops.most_common(8))


def _inputs(geom, heads: int = 2, D: int = 128):
    q, k, v = (torch.randn(1, heads, geom.seq_len, D, dtype=torch.bfloat16) for _ in range(3))
    kv_idx = torch.zeros(1, heads, geom.n_tiles, geom.n_tiles, dtype=torch.int32)
    kv_cnt = torch.ones(1, heads, geom.n_tiles, dtype=torch.int32)
    return q, k, v, kv_idx, kv_cnt, torch.zeros(1, 1, geom.padded_len)


def _launch(variant: str, tuning_overrides: dict | None = None):
    """Run the op path of ``variant`` (its kernel launch is captured by the caller)."""
    from dataclasses import replace

    from draftopt.kernels import Geometry
    from draftopt.kernels.geometry import permuted_source_index
    from draftopt.kernels.gluon import attention as A
    from draftopt.kernels.ops.quantize import fp8_operands_reference

    exact, padded = Geometry((2, 16, 32), (8, 16), 77, "end"), Geometry((2, 45, 80), (8, 16))
    strips = Geometry((2, 1, 45 * 80), (1, 128))
    scale = 128 ** -0.5
    tuning, fp8_tuning = (replace(t, **(tuning_overrides or {})) for t in (A.DEFAULT_TUNING, A.DEFAULT_FP8_TUNING))
    if variant in ("in-place", "edge", "bias", "strips"):
        geom = {"in-place": exact, "edge": padded, "bias": padded, "strips": strips}[variant]
        q, k, v, kv_idx, kv_cnt, bias = _inputs(geom)
        A.attend_sm90_in_place(q, k, v, kv_idx, kv_cnt, bias, scale, geom, variant == "bias", tuning)
        return
    geom = padded if variant == "fp8-edge" else exact
    q, k, v, kv_idx, kv_cnt, bias = _inputs(geom)
    src = permuted_source_index(geom)
    qp, kp, vp = (t[:, :, src.clamp(min=0)].contiguous() for t in (q, k, v))
    if variant == "tile-major":
        A.attend_sm90(qp, kp, vp, kv_idx, kv_cnt, bias, scale, geom.n_tiles, geom.n_text_blocks, True, tuning)
    else:
        ops = fp8_operands_reference(q, k, v, src, geom.block)
        A.attend_sm90_fp8(*ops, kv_idx, kv_cnt, bias, scale, geom.n_tiles, geom.n_text_blocks, variant != "fp8-edge",
                          q.dtype, fp8_tuning, edges=A.edge_grid(geom, False),
                          out_geom=geom if variant == "fp8-out" else None)


def compile_variant(variant: str, tuning_overrides: dict | None = None) -> dict:
    """Compile one variant for sm_90: its metadata, cubin and SASS."""
    from triton.runtime import driver  # the DriverConfig

    from draftopt.kernels.gluon import _sm90_kernel as K
    from draftopt.kernels.gluon import attention as A

    compiled = {}
    kernel = K._attend_sm90_kernel

    class _Capture:  # kernel[grid](...) -> warmup: compile for the driver's target, launch nothing
        def __getitem__(self, grid):
            def call(*args, **kwargs):
                compiled["kernel"] = kernel.warmup(*args, grid=grid, **kwargs)
                compiled["constexprs"] = {k: v for k, v in kwargs.items() if k != "num_warps"}
            return call

    # The active driver as set, not ``.active``: reading that builds the CUDA driver, which needs libcuda.
    saved = (driver._active, K._attend_sm90_kernel, A._n_sm, torch.Tensor.is_cuda)
    driver.set_active(_Sm90Driver())
    K._attend_sm90_kernel, A._n_sm = _Capture(), (lambda index: 132)
    torch.Tensor.is_cuda = property(lambda self: True)  # the descriptors accept only CUDA tensors
    try:
        _launch(variant, tuning_overrides)
    finally:
        driver._active = saved[0]
        K._attend_sm90_kernel, A._n_sm, torch.Tensor.is_cuda = saved[1:]
    return compiled


def _cuobjdump(args: list[str], cubin: bytes) -> str:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, *args, f.name], capture_output=True, text=True, check=True).stdout


def wgmma_serialized(ptx: str) -> bool:
    """Whether ptxas serializes the kernel's wgmma (its advisory C7514: an instruction touches the registers
    of a product in flight, e.g. a copy of a loop-carried accumulator). Triton drops ptxas' advisories,
    so the PTX is compiled again here with ``-v``; a serialized kernel runs every product synchronously."""
    from triton.backends.nvidia.compiler import get_ptxas

    tool = get_ptxas(90).path  # the one Triton compiled the kernel with (3.9 picks a newer build for sm_90)
    with tempfile.TemporaryDirectory() as d:
        src, out = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        done = subprocess.run([tool, "-arch=sm_90a", "-v", src, "-o", out], capture_output=True, text=True, check=True)
    return "C7514" in done.stdout + done.stderr


def row(variant: str, sass_dir: str | None, tuning_overrides: dict | None = None) -> list:
    c = compile_variant(variant, tuning_overrides)
    kernel, cubin = c["kernel"], c["kernel"].asm["cubin"]
    usage = _cuobjdump(["-res-usage"], cubin)
    regs = re.search(r"REG:(\d+)", usage)
    local = re.search(r"LOCAL:(\d+)", usage)
    sass = _cuobjdump(["-sass"], cubin)
    if sass_dir:
        with open(os.path.join(sass_dir, f"sm90_{variant}.sass"), "w") as f:
            f.write(sass)
    n, mix = loop_mix(sass)
    shown = ("VISUAL_BIAS", "IN_PLACE", "TILE_H", "FP8", "EDGE", "PINGPONG", "ROWSUM_MMA", "STORE_IN_PLACE")
    keys = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in c["constexprs"].items() if k in shown)
    return [variant, keys, int(regs.group(1)) if regs else None, int(local.group(1)) if local else None,
            round(kernel.metadata.shared / 1024, 1), sass.count("MUFU.EX2"),
            "yes" if wgmma_serialized(kernel.asm["ptx"]) else "no", n, mix]


def _overrides(pairs: list[str]) -> dict:
    """``["rowsum_mma=1", "k_stages=3"]`` -> Sm90Tuning keyword arguments (ints; booleans as 0 / 1)."""
    from dataclasses import fields

    from draftopt.kernels.gluon.attention import Sm90Tuning

    types = {f.name: f.type for f in fields(Sm90Tuning)}
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or name not in types or not value.isdigit():
            raise SystemExit(f"error: --tuning takes FIELD=INT with FIELD one of {sorted(types)}, got {pair!r}")
        out[name] = bool(int(value)) if types[name] in (bool, "bool") else int(value)
    return out


def main(argv=None) -> list[list]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--sass", metavar="DIR", help="write each variant's SASS to DIR/sm90_<variant>.sass")
    ap.add_argument("--out", help="where the run's JSON and CSV go (default $OUT or '.')")
    ap.add_argument("--no-save", action="store_true", help="print only (no results rows)")
    ap.add_argument("--tuning", nargs="+", default=[], metavar="FIELD=VALUE",
                    help="Sm90Tuning fields to override for every variant, e.g. rowsum_mma=1 pingpong=0")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("error: unset TRITON_INTERPRET: the interpreter compiles nothing")
    from draftopt.kernels.gluon import _sm90_kernel as K

    if not K.HAVE_GLUON:
        raise SystemExit(f"error: this Triton has no Gluon ({K.IMPORT_ERROR})")
    if args.sass:
        os.makedirs(args.sass, exist_ok=True)
    rows = [row(v, args.sass, _overrides(args.tuning)) for v in args.variants]
    import triton

    print(f"sm_90 compiles on {'a GPU-less machine' if not torch.cuda.is_available() else 'this machine'}, "
          f"triton {triton.__version__}, torch {torch.__version__}")
    print(tabulate(rows, headers=HEADERS))
    if not args.no_save:
        _results.save_table("sm90_sass", HEADERS, rows, dict(device="sm_90 (compiled, not run)",
                                                             triton=triton.__version__), out=args.out)
    return rows


if __name__ == "__main__":
    sys.exit(main() and 0)
