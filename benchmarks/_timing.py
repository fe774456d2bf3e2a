"""Timing helpers shared by the benchmark scripts (run as ``python benchmarks/NAME.py``)."""

import torch


def graphed(fn):
    """fn captured in a CUDA graph after two warm-ups on a side stream: returns the replay.

    Timing replays measures the GPU as a compiled model under CUDA graphs runs
    it, without Python launch overhead.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def wall_ms(fn, cuda: bool, n: int = 5, warmup: int = 2) -> float:
    """Mean wall-clock ms of fn over n calls after warm-up calls (compiles, CUDA-graph recording)."""
    import time

    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3
