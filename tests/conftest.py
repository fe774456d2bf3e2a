"""Test setup shared by every layer.

Without a GPU, Triton kernels run under the interpreter: TRITON_INTERPRET must
be set before any @triton.jit decorator runs, i.e. before draftopt is imported.
"""

import os
import random

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Fresh random inputs every run; DRAFTOPT_TEST_SEED=N replays a failing run.
SEED = int(os.environ.get("DRAFTOPT_TEST_SEED", random.randrange(2**31)))


def pytest_report_header(config):
    return f"draftopt: seed {SEED} (DRAFTOPT_TEST_SEED to replay), cuda={HAS_CUDA}"


@pytest.fixture(autouse=True)
def _seed(request):
    # One seed per test, derived from the run seed and the test id.
    torch.manual_seed(SEED ^ (hash(request.node.nodeid) & 0x7FFFFFFF))


@pytest.fixture
def device():
    return "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
