"""The test helpers themselves: poisoned allocations reach inside the ops; the per-test seed replays."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.library import custom_op, triton_op

from .conftest import per_test_seed
from .helpers import INT_POISON, poison_outputs


# Ops that forget to write their last row (and, for the int outputs, their last entry).
@custom_op("draftopt_test::half_written", mutates_args=())
def half_written(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out[:-1] = x[:-1]
    return out


@triton_op("draftopt_test::half_written_like", mutates_args=())
def half_written_like(x: torch.Tensor) -> torch.Tensor:  # registered like the draftopt ops
    out = torch.empty_like(x)
    out[:-1] = x[:-1]
    return out


@custom_op("draftopt_test::counts", mutates_args=())
def counts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a = x.new_empty((x.shape[0],), dtype=torch.int32)
    b = torch.empty_strided((x.shape[0],), (1,), dtype=torch.int64, device=x.device)
    a[:-1] = 1
    b[:-1] = 2
    return a, b


@pytest.mark.parametrize("op", [torch.ops.draftopt_test.half_written, torch.ops.draftopt_test.half_written_like],
                         ids=["custom_op", "triton_op"])
def test_poison_reaches_inside_an_op(op):
    x = torch.randn(4, 3)
    with poison_outputs():
        out = op(x)
    assert torch.equal(out[:-1], x[:-1])
    assert out[-1].isnan().all(), "the row the op never wrote must be NaN"


def test_poison_fills_integers_and_every_allocator():
    with poison_outputs():
        a, b = torch.ops.draftopt_test.counts(torch.randn(5))
        small = torch.empty(3, dtype=torch.int8)
        flags = torch.empty(3, dtype=torch.bool)
        leaf = torch.empty(2, requires_grad=True)
    assert a.tolist() == [1] * 4 + [INT_POISON] and b.tolist() == [2] * 4 + [INT_POISON]
    assert small.tolist() == [-128] * 3 and flags.all()
    assert leaf.requires_grad and leaf.isnan().all()


def test_poison_is_undone_on_exit_even_after_an_error():
    saved = (torch.empty, torch.empty_like, torch.empty_strided, torch.Tensor.new_empty)
    with pytest.raises(KeyError, match="inside"):
        with poison_outputs():
            assert torch.empty is not saved[0]
            with poison_outputs():  # nested: the inner one restores the outer one's functions
                pass
            assert torch.empty(2).isnan().all()
            raise KeyError("inside")
    assert (torch.empty, torch.empty_like, torch.empty_strided, torch.Tensor.new_empty) == saved
    assert "new_empty" not in torch.Tensor.__dict__  # inherited from TensorBase again


def test_seed_replays_across_processes(tmp_path):
    """DRAFTOPT_TEST_SEED=N gives a test the same torch seed in another process (a str's hash() is salted
    per process, so it could not), and a failure shows the seed that replays it."""
    tests = tmp_path / "tests"
    tests.mkdir()
    shutil.copy(os.path.join(os.path.dirname(__file__), "conftest.py"), tests / "conftest.py")
    (tests / "test_draw.py").write_text(textwrap.dedent("""
        import torch

        def test_draw():
            print("draw", torch.rand(3).tolist())
            assert False
    """))
    hash_seed = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"  # not this process's
    env = {**os.environ, "DRAFTOPT_TEST_SEED": "12345", "PYTHONHASHSEED": hash_seed}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    seed = per_test_seed(12345, "tests/test_draw.py::test_draw")
    assert f"DRAFTOPT_TEST_SEED=12345 replays this run (this test: torch.manual_seed({seed}))" in res.stdout
    drawn = next(line for line in res.stdout.splitlines() if line.startswith("draw "))
    assert drawn == f"draw {torch.rand(3, generator=torch.Generator().manual_seed(seed)).tolist()}"
