"""Two CPU ranks (gloo, loopback) run a tiny Wan with diffusers' Ulysses context
parallelism through draftopt and compare with the single-process draftopt output.

    python tests/api/cp_worker.py OUT.json

Works around three diffusers 0.42.1 issues (see README, multi-GPU section):
W1 device_count() is 0 on CPU; W2 the plan's "" (timestep) entry calls a logger
method that does not exist; W3 the split hook's first call is not traceable.
"""

import json
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import draftopt  # noqa: E402
from tests.helpers import CPU_OPTIONS  # noqa: E402
from tests.models import tiny_wan, wan_inputs  # noqa: E402

SPARSITIES = (0.0, 0.9)
OPTS = {**CPU_OPTIONS, "fullgraph": True}


def build():
    torch.manual_seed(0)
    model = tiny_wan()
    torch.manual_seed(1)
    return model, wan_inputs()


def single_process():
    model, inputs = build()
    with torch.no_grad():
        return {s: draftopt.optimize(model, sparsity=s, **OPTS)(**inputs)[0] for s in SPARSITIES}


def worker(rank, port, refs, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        from diffusers import ContextParallelConfig

        model, inputs = build()
        device_count = torch.accelerator.device_count
        torch.accelerator.device_count = lambda: 1  # W1
        plan = {k: v for k, v in type(model)._cp_plan.items() if k != ""}  # W2
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2), cp_plan=plan)
        torch.accelerator.device_count = device_count
        out = {}
        with torch.no_grad():
            model(**inputs)  # W3
            for s in SPARSITIES:
                torch._dynamo.reset()
                m = draftopt.optimize(model, sparsity=s, **OPTS)
                y = m(**inputs)[0]
                sites = [dict(name=r.name, status=r.status, parallel=r.parallel, q_shape=list(r.q_shape),
                              reason=r.reason) for r in draftopt.report(m).sites]
                out[str(s)] = dict(max_diff=(y - refs[s]).abs().max().item(), sites=sites)
        results[rank] = out
    finally:
        dist.destroy_process_group()


def main(path):
    refs = single_process()
    torch._dynamo.reset()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(worker, args=(port, refs, results), nprocs=2)
    with open(path, "w") as f:
        json.dump(dict(results), f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
