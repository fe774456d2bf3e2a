"""onnxruntime CPU time of the tiny diffusers models exported with ``draftopt.export_onnx``.

    python benchmarks/onnx_cpu.py [--repeat 20] [--threads 0]

For each model (examples/report_factories.py: tiny_wan, tiny_hunyuan; 2048 video
tokens, tiles of 8 x 16) and sparsity (0, 0.9): the exported file's median
onnxruntime CPU time per call, next to the same model exported without draftopt
(``enabled=False``: every site plain attention). The draftopt node's function
body computes dense scores and masks them, so the file is a portability path:
it runs anywhere ONNX runs and computes what PyTorch's draftopt computes, but
it is not faster than dense attention (a runtime plug-in for the node would be;
docs/tensorrt.md). Needs the onnx extra.
"""

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings

import torch
from tabulate import tabulate

from _results import save_table

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))

import draftopt  # noqa: E402
import onnxruntime as ort  # noqa: E402
from report_factories import tiny_hunyuan, tiny_wan  # noqa: E402

MODELS = {"tiny_wan": tiny_wan, "tiny_hunyuan": tiny_hunyuan}
SPARSITIES = (0.0, 0.9)


def session(path: str, threads: int):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def time_file(path: str, inputs: dict, repeat: int, threads: int) -> float:
    """Median ms of one onnxruntime call (after two warm-up calls)."""
    sess = session(path, threads)
    feed = {i.name: inputs[i.name].numpy() for i in sess.get_inputs()}
    for _ in range(2):
        sess.run(None, feed)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def export(model, inputs, path, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return draftopt.export_onnx(model, (), path, example_kwargs=inputs, min_tokens=0, **config)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, factory in MODELS.items():
            model, inputs = factory()
            dense_path = os.path.join(tmp, f"{name}_dense.onnx")
            export(model, inputs, dense_path, enabled=False)
            dense_ms = time_file(dense_path, inputs, args.repeat, args.threads)
            for sparsity in SPARSITIES:
                path = os.path.join(tmp, f"{name}_{sparsity}.onnx")
                exported = export(model, inputs, path, sparsity=sparsity)
                site = draftopt.report(exported).rewritten[0]
                ms = time_file(path, inputs, args.repeat, args.threads)
                rows.append([name, "x".join(map(str, site.grid)), site.n_tiles, sparsity, len(exported.onnx_nodes),
                             f"{ms:.1f}", f"{dense_ms:.1f}", f"{ms / dense_ms:.2f}x"])
    headers = ["model", "grid", "tiles", "sparsity", "draftopt nodes", "onnxruntime ms", "dense export ms",
               "vs dense"]
    cpu = platform.processor() or platform.machine()
    meta = dict(device=f"CPU ({cpu}, {os.cpu_count()} cores)", onnxruntime=ort.__version__, threads=args.threads,
                repeat=args.repeat, torch=torch.__version__)
    print(f"onnxruntime {ort.__version__} CPU ({cpu}, {os.cpu_count()} cores, threads={args.threads or 'default'}), "
          f"median of {args.repeat} calls; the draftopt body computes dense scores and masks them")
    print(tabulate(rows, headers=headers))
    save_table("onnx_cpu", headers, rows, meta)
    return rows


if __name__ == "__main__":
    main()
