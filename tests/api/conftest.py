import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # diffusers' forward wrappers share one code object across model instances:
    # without a reset, compiled entries of earlier tests count toward Dynamo's
    # per-code recompile limit.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
