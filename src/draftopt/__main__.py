"""Command line: ``python -m draftopt report MODULE:FACTORY [...]``.

FACTORY is a function in MODULE (an importable module or a .py path) that
returns ``(model, example_args)``; example_args is a tuple of positional
arguments or a dict of keyword arguments. The model is optimized and run once
on the CPU (the PyTorch path of the ops; no GPU needed), then the report is
printed or written.

    python -m draftopt report examples/report_factories.py:toy_dit --format md
    python -m draftopt report examples/report_factories.py:tiny_wan --min-tokens 0 --sparsity 0.8 --format html --out wan.html
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

from .kernels.sparsity import POLICIES


def _load_factory(spec: str):
    if ":" not in spec:
        raise SystemExit(f"error: expected MODULE:FACTORY, got {spec!r} (e.g. examples/report_factories.py:toy_dit)")
    module_name, func = spec.rsplit(":", 1)
    if module_name.endswith(".py") or os.sep in module_name:
        if not os.path.exists(module_name):
            raise SystemExit(f"error: no such file {module_name!r}")
        mod_spec = importlib.util.spec_from_file_location("_draftopt_factory", module_name)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        sys.path.insert(0, os.getcwd())
        module = importlib.import_module(module_name)
    if not hasattr(module, func):
        raise SystemExit(f"error: {module_name} has no function {func!r}")
    return getattr(module, func)


def _tile(words: list[str]):
    """--tile TH TW, or --tile strips / auto (``DraftConfig.tile``; it names a bad value)."""
    if len(words) == 1:
        return words[0]
    try:
        return tuple(int(w) for w in words)
    except ValueError:
        raise ValueError(f"--tile takes TH TW (two ints), 'strips' or 'auto', got {' '.join(words)!r}") from None


def _report(args) -> int:
    import torch

    import draftopt

    model, example = _load_factory(args.factory)()
    options = dict(sparsity=args.sparsity, compiler="eager", tile=_tile(args.tile))
    if args.latent_shape:
        options["latent_shape"] = tuple(args.latent_shape)
    if args.min_tokens is not None:
        options["min_tokens"] = args.min_tokens
    if args.policy:
        options["policy"] = args.policy
    optimized = draftopt.optimize(model, **options)
    with torch.no_grad():
        optimized(**example) if isinstance(example, dict) else optimized(*example)
    rep = draftopt.report(optimized)
    text = {"text": str, "md": draftopt.Report.to_markdown, "json": draftopt.Report.to_json,
            "html": draftopt.Report.to_html}[args.format](rep)
    if args.diff:
        text += "\n\n" + rep.code_diff()
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out}: {len(rep.rewritten)} of {len(rep.sites)} attention sites rewritten")
    else:
        print(text)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m draftopt", description="draftopt: draft-attention sparse "
                                     "attention for video diffusion transformers.")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="optimize a model on the CPU and print what draftopt does to it",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    rep.add_argument("factory", metavar="MODULE:FACTORY", help="returns (model, example_args)")
    rep.add_argument("--latent-shape", type=int, nargs=3, metavar=("T", "H", "W"))
    rep.add_argument("--sparsity", type=float, default=0.9)
    rep.add_argument("--policy", choices=list(POLICIES))
    rep.add_argument("--tile", nargs="+", default=["auto"], metavar="TILE",
                     help="'auto' (the default), 'strips' or TH TW (DraftConfig.tile)")
    rep.add_argument("--min-tokens", type=int, help="skip sites with fewer visual tokens (default: DraftConfig's)")
    rep.add_argument("--format", choices=["text", "md", "json", "html"], default="text")
    rep.add_argument("--diff", action="store_true", help="append the graph code diff")
    rep.add_argument("--out", help="write to this file instead of printing")
    args = parser.parse_args(argv)
    from .backend import DenseSitesError

    try:
        return _report(args)
    except (ValueError, DenseSitesError) as e:  # bad arguments: say what to change, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
