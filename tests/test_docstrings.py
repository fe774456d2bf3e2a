"""The examples in docstrings run as written (so they cannot drift from the code)."""

import doctest
import importlib

import pytest

MODULES = [
    "draftopt.kernels.geometry", "draftopt.kernels.ops.pool", "draftopt.kernels.ops.draft_map",
    "draftopt.kernels.ops.block_mass", "draftopt.kernels.ops.select", "draftopt.kernels.control",
    "draftopt.passes.config", "draftopt.kernels.ops.quantize", "draftopt.kernels.dispatch",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, extraglobs={"torch": importlib.import_module("torch")},
                             optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
