"""Test setup shared by every layer.

Without a GPU, Triton kernels run under the interpreter: TRITON_INTERPRET must
be set before any @triton.jit decorator runs, i.e. before draftopt is imported.
"""

import os
import random
import zlib

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Fresh random inputs every run; DRAFTOPT_TEST_SEED=N replays a failing run.
# Under pytest-xdist every worker draws the same run seed from the run's shared id.
_RUN_ID = os.environ.get("PYTEST_XDIST_TESTRUNUID")
SEED = int(os.environ.get("DRAFTOPT_TEST_SEED",
                          int(_RUN_ID, 16) % 2**31 if _RUN_ID else random.randrange(2**31)))


def per_test_seed(run_seed: int, nodeid: str) -> int:
    """The torch seed of one test: the run seed mixed with a hash of the test id that is the same in
    every process (Python's hash() of a str is salted per process, so it could not replay a run)."""
    return run_seed ^ (zlib.crc32(nodeid.encode()) & 0x7FFFFFFF)


def pytest_report_header(config):
    return f"draftopt: seed {SEED} (DRAFTOPT_TEST_SEED to replay), cuda={HAS_CUDA}"


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(per_test_seed(SEED, request.node.nodeid))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.failed:  # the seed beside the failure, not only in the run's header
        report.sections.append(("draftopt seed", f"DRAFTOPT_TEST_SEED={SEED} replays this run (this test: "
                                                 f"torch.manual_seed({per_test_seed(SEED, item.nodeid)}))"))


@pytest.fixture
def device():
    return "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
