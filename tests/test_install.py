"""draftopt installed as a user installs it: a fresh virtual environment with the declared
dependencies only (no numpy, no diffusers, no test extras), then ``import draftopt`` and the
README demo. Catches an import of an undeclared package at import time.

Slow (a venv and a torch install: about a minute from the local wheels); deselect with
``-m "not install"``.
"""

import os
import shutil
import subprocess
import sys
import re
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH = "torch==2.13.0"  # the CPU build: the local index serves it


def declared_dependencies() -> list[str]:
    """The names in pyproject.toml's ``dependencies = [...]`` (one line there)."""
    with open(os.path.join(REPO, "pyproject.toml")) as f:
        (line,) = [line for line in f if line.startswith("dependencies")]
    return [re.split(r"[<>=!~ \[;]", d, maxsplit=1)[0] for d in re.findall(r'"([^"]+)"', line)]


def run(cmd, cwd, env, timeout=600):
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.mark.install
def test_import_and_demo_with_only_the_declared_dependencies(tmp_path):
    start = time.perf_counter()
    # the venv gets what is declared: a new dependency must be added here too
    assert declared_dependencies() == ["torch", "triton", "tabulate"]
    # What a user's shell has: none of this session's paths, interpreter switches or test settings.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "TRITON_", "DRAFTOPT_", "VIRTUAL_ENV", "PYTEST"))}
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], tmp_path, env)  # no system site packages
    python = str(venv / "bin" / "python")
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    # --no-compile: byte-compiling all of torch costs more than the few modules an import compiles
    run([python, "-m", "pip", "install", "-q", "--no-compile", TORCH, "triton", "tabulate"], tmp_path, env)
    # a copy of the package's sources: building in the work tree would leave build/ behind
    src = tmp_path / "draftopt-src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if os.path.exists(os.path.join(REPO, name)):
            shutil.copy(os.path.join(REPO, name), src / name)
    shutil.copytree(os.path.join(REPO, "src"), src / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    run([python, "-m", "pip", "install", "-q", "--no-deps", str(src)], tmp_path, env)
    installed = time.perf_counter() - start

    probe = run([python, "-c", "import importlib.util, draftopt; print(draftopt.__file__); "
                               "print(importlib.util.find_spec('numpy'))"], tmp_path, env)
    location, numpy_spec = probe.stdout.split()[-2:]
    assert location.startswith(str(venv)), f"imported {location}, not the venv's install"
    assert numpy_spec == "None", "numpy must not be installed in this venv (it is not a dependency)"
    demo = run([python, os.path.join(REPO, "examples", "draft_attention_demo.py")], tmp_path, env)
    assert demo.stdout.strip(), "the demo printed nothing"
    total = time.perf_counter() - start
    print(f"venv + install {installed:.1f} s, import + demo {total - installed:.1f} s")
