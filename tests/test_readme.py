"""README.md's code blocks, run as written where a CPU can run them, so the docs cannot drift.

Every ```python and ```bash block is classified below, by a marker string that occurs in exactly one
block: run as written (bash commands, the `pip install` steps dropped, since this test runs against
the installed package), run with explicit substitutions (the kernel example, which needs a GPU at its
size), or skipped with the reason (`-rs` lists them). A new block fails test_every_block_is_classified
until it is added here. Every python block must at least compile.
"""

from __future__ import annotations

import ast
import contextlib
import io
import math
import os
import re
import runpy
import shlex
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
FACTORIES = os.path.join(REPO, "examples", "report_factories.py")

# marker -> why the block does not run here
SKIPPED = {
    "pip install torch==2.13.0": "installs torch",
    "pip install torch --index-url": "installs torch",
    'pip install -e ".[test]" && python -m pytest': "installs the test extra and runs the whole suite",
    'python -m pytest -q -n 2 --dist loadfile tests -m "not install"': "runs the whole suite, this file included",
    "model = draftopt.optimize(model, latent_shape=(T, H, W)": "placeholders: the reader's model and latent shape",
    "WanTransformer3DModel.from_pretrained": "downloads a checkpoint and moves it to the GPU",
    'backend="draftopt"': "placeholder model; the backend by name is tested in tests/api",
    "capture_masks=True": "placeholder model and inputs; mask pictures are tested in tests/api/test_report.py",
    "for i, t in enumerate(timesteps)": "placeholder transformer, timesteps and inputs",
    "DenseWarmup(pipe.transformer": "a diffusers pipeline from a checkpoint",
    "runtime_sparsity=True)\ndraftopt.set_sparsity": "placeholder transformer and pipeline; tests/api/test_schedule.py "
                                                     "runs set_sparsity and SparsitySchedule on a tiny model",
    'dist.init_process_group("nccl")': "torchrun on GPUs (NCCL); tests/api/test_context_parallel.py runs it on gloo",
    "draftopt.export_onnx(transformer": "placeholder transformer and inputs; tests/api/test_onnx.py exports "
                                        "tiny diffusers models",
    "draftopt.export_program(transformer": "placeholder transformer and inputs; tests/api/test_onnx.py runs this "
                                           "path on a tiny Wan",
    "draftopt.use_attention_backend(transformer": "placeholder transformer and inputs; the diffusers backend is tested "
                                                  "in tests/api/test_diffusers_backend.py",
}
# bash blocks run command by command, `pip install` steps dropped
RUN = {
    "pip install -e . && python examples/draft_attention_demo.py": "the demo",
    "python -m draftopt report examples/report_factories.py:": "the report CLI on every example factory",
}
# the kernel example at small shapes on the CPU: (as in README.md, replacement); each must occur once
KERNEL = "from draftopt.kernels import draft_attention"
KERNEL_SUBSTITUTIONS = [
    ('device="cuda"', 'device="cpu"'),
    ("torch.randn(3, 1, 12, 8 * 30 * 52 + 256, 128,", "torch.randn(3, 1, 2, 2 * 16 * 32 + 20, 64,"),
    ("grid=(8, 30, 52), text_len=256,", "grid=(2, 16, 32), text_len=20,"),
]
KERNEL_SMALL = dict(heads=2, tiles=2 * 2 * 2)  # what the substituted block's mask prints


def fenced_blocks() -> list[tuple[str, str]]:
    """(language, text) of each fenced block of README.md, in order."""
    with open(README) as f:
        return re.findall(r"^```([^\n]*)\n(.*?)^```", f.read(), flags=re.S | re.M)


def code_blocks() -> list[tuple[str, str]]:
    """(language, text) of each ```python / ```bash block of README.md, in order."""
    return [(lang, body) for lang, body in fenced_blocks() if lang in ("python", "bash")]


def classified(marker_table) -> dict[str, str]:
    """marker -> the one block that contains it."""
    out = {}
    for marker in marker_table:
        hits = [body for _, body in code_blocks() if marker in body]
        assert len(hits) == 1, f"README marker {marker!r} is in {len(hits)} code blocks, not one: update {__file__}"
        out[marker] = hits[0]
    return out


def test_every_block_is_classified():
    other = sorted({lang for lang, _ in fenced_blocks()} - {"python", "bash", ""})
    assert not other, f"README has ```{other[0]} blocks: write them as ```python or ```bash (or unlabelled)"
    markers = [*SKIPPED, *RUN, KERNEL]
    for lang, body in code_blocks():
        hits = [m for m in markers if m in body]
        assert len(hits) == 1, (f"this README {lang} block matches {hits or 'no marker'}: classify it in "
                                f"{__file__} (run it, substitute, or skip it with a reason):\n{body}")
    classified(markers)  # and each marker names exactly one block


@pytest.mark.parametrize("marker", SKIPPED)
def test_skipped_block(marker):
    """One entry per block that does not run here, so that -rs lists them with the reason."""
    classified([marker])
    pytest.skip(f"README block with {marker!r}: {SKIPPED[marker]}")


@pytest.mark.parametrize("index", range(len([b for b in code_blocks() if b[0] == "python"])))
def test_python_blocks_compile(index):
    body = [b for lang, b in code_blocks() if lang == "python"][index]
    compile(body, f"README.md python block {index}", "exec")


def commands(block: str) -> list[str]:
    """The shell commands of a bash block, one a line, without the `pip install` steps."""
    out = []
    for line in block.splitlines():
        parts = [p.strip() for p in line.split("&&") if p.strip() and not p.strip().startswith("#")]
        out += [p for p in parts if not p.startswith("pip install")]
    return out


def check_report_output(cmd: str, stdout: str, cwd) -> None:
    """A report command did what it says: some site rewritten, in the format asked, where asked."""
    argv = cmd.split()
    out = argv[argv.index("--out") + 1] if "--out" in argv else None
    if out:
        m = re.search(r"wrote \S+: (\d+) of (\d+) attention sites rewritten", stdout)
        with open(os.path.join(cwd, out)) as f:
            text = f.read()
    else:
        m = re.search(r"(\d+) attention site\(s\): (\d+) rewritten", stdout)
        text = stdout
    assert m, f"{cmd}: no count of rewritten sites in its output:\n{stdout[-2000:]}"
    rewritten = int(m.group(1) if out else m.group(2))
    assert rewritten > 0, f"{cmd} rewrote no attention site:\n{stdout[-2000:]}"
    fmt = argv[argv.index("--format") + 1] if "--format" in argv else "text"
    marker = {"md": "|---", "html": "<html", "json": '"sites"', "text": "Attention sites"}[fmt]
    assert marker in text, f"{cmd}: the output is not {fmt}"


RUN_COMMANDS = [c for marker in RUN for _, body in code_blocks() if marker in body for c in commands(body)]


@pytest.mark.parametrize("cmd", RUN_COMMANDS)
def test_bash_command_runs_as_written(cmd, tmp_path, monkeypatch):
    """In this process (an interpreter start and `import draftopt` per command would cost more than the
    commands), from a directory holding the repository's examples/, so that `--out wan.html` lands in
    tmp_path: `python -m draftopt ARGS` is draftopt.__main__.main(ARGS), `python FILE.py` runs FILE."""
    import draftopt.__main__

    (tmp_path / "examples").symlink_to(os.path.join(REPO, "examples"))
    monkeypatch.chdir(tmp_path)
    argv = shlex.split(cmd)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        if argv[:3] == ["python", "-m", "draftopt"]:
            assert draftopt.__main__.main(argv[3:]) == 0, f"{cmd} failed"
        elif argv[0] == "python" and len(argv) == 2 and argv[1].endswith(".py"):
            monkeypatch.setattr(sys, "argv", argv[1:])
            runpy.run_path(argv[1], run_name="__main__")
        else:
            pytest.fail(f"README command {cmd!r}: teach {__file__} to run it, or skip its block")
    stdout = printed.getvalue()
    if argv[:4] == ["python", "-m", "draftopt", "report"]:
        check_report_output(cmd, stdout, tmp_path)
    else:
        assert stdout.strip(), f"{cmd} printed nothing"


def test_readme_runs_the_report_cli():
    assert any(c.startswith("python -m draftopt report ") for c in RUN_COMMANDS)


def factory_names(text: str) -> set[str]:
    return set(re.findall(r"report_factories\.py:(\w+)", text))


def test_every_advertised_factory_exists_and_the_readme_runs_each():
    import draftopt.__main__

    with open(FACTORIES) as f:
        tree = ast.parse(f.read())
    with open(README) as f:
        readme = f.read()
    defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")}
    advertised = {
        "README.md": factory_names(readme),
        "python -m draftopt report --help": factory_names(draftopt.__main__.__doc__),
        "examples/report_factories.py's docstring": factory_names(ast.get_docstring(tree)),
    }
    for where, names in advertised.items():
        assert names <= defined, f"{where} advertises {sorted(names - defined)}, not in examples/report_factories.py"
    in_readme_commands = factory_names(classified(RUN)["python -m draftopt report examples/report_factories.py:"])
    assert in_readme_commands == defined, "README's report commands must run every example factory"


def test_kernel_example_at_small_shapes_on_cpu():
    (block,) = classified([KERNEL]).values()
    small = block
    for old, new in KERNEL_SUBSTITUTIONS:
        assert block.count(old) == 1, (f"README's kernel example no longer contains {old!r} exactly once: update "
                                       f"KERNEL_SUBSTITUTIONS in {__file__}:\n{block}")
        small = small.replace(old, new)
    assert "cuda" not in small and "tile=" not in small  # nothing else needs a GPU; the default tile (8, 16)

    printed = io.StringIO()
    scope = {}
    with contextlib.redirect_stdout(printed):
        exec(compile(small, "README.md kernel example (small)", "exec"), scope)
    assert scope["out"].shape == scope["q"].shape
    heads, S = KERNEL_SMALL["heads"], KERNEL_SMALL["tiles"]
    assert printed.getvalue().startswith(f"DraftBlockMask(batch=1, heads={heads}, tiles={S}x{S},"), printed.getvalue()

    # The comment describes the full-size call: its numbers must follow from the block's shapes.
    (comment,) = re.findall(r"print\(mask\)\s+# (DraftBlockMask\(.*\))", block)
    T, H, W = map(int, re.search(r"grid=\((\d+), (\d+), (\d+)\)", block).groups())
    heads = int(re.search(r"torch\.randn\(3, 1, (\d+),", block).group(1))
    sparsity = float(re.search(r"sparsity=([\d.]+)", block).group(1))
    assert 'policy="mass"' in block
    S = T * math.ceil(H / 8) * math.ceil(W / 16)
    assert f"batch=1, heads={heads}, tiles={S}x{S}," in comment, comment
    kept = math.ceil(round((1 - sparsity) * S * S, 6))  # the top entries, plus at most S diagonal tiles
    lo, hi = 1 - (kept + S) / (S * S), 1 - kept / (S * S)
    (claimed,) = re.findall(r"sparsity=([\d.]+)x", comment)
    assert f"{lo:.6f}".startswith(claimed) and f"{hi:.6f}".startswith(claimed), (comment, lo, hi)
