"""draftopt under diffusers' context parallelism, on CPU: 2 gloo ranks (loopback), and ring detection."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

from draftopt import DraftConfig
from draftopt.passes import DraftAttentionPass

pytest.importorskip("diffusers")
HERE = os.path.dirname(os.path.abspath(__file__))


def test_ulysses_two_ranks_match_single_process(tmp_path):
    out = tmp_path / "cp.json"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, os.path.join(HERE, "cp_worker.py"), str(out)], env=env,
                         capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads(out.read_text())
    assert sorted(results) == ["0", "1"]
    for rank, per_sparsity in results.items():
        for sparsity, r in per_sparsity.items():
            assert r["max_diff"] < 1e-5, (rank, sparsity, r["max_diff"])
            attn1 = [s for s in r["sites"] if s["name"].endswith("attn1")]
            assert [s["name"] for s in attn1] == ["blocks.0.attn1", "blocks.1.attn1"]
            for s in attn1:  # full sequence, half the heads, on each rank
                assert (s["status"], s["parallel"], s["q_shape"]) == ("rewritten", "ulysses", [1, 1, 256, 16])


@pytest.fixture
def one_rank_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def _records(fn, *inputs):
    records = []

    def backend(gm, example_inputs):
        cfg = DraftConfig(latent_shape=(2, 4, 8), tile=(4, 4), min_tokens=0, sparsity=0.5)
        records.extend(DraftAttentionPass(cfg)(gm))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*inputs)
    return records


def test_ring_attention_is_skipped_with_a_reason(one_rank_group):
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))

    def ring_step(q, k, v):  # keys and values gathered from the other ranks' shards
        kv = funcol.all_gather_tensor(torch.cat([k, v]), 0, one_rank_group)
        k2, v2 = kv.chunk(2)
        return F.scaled_dot_product_attention(q, k2, v2)

    (rec,) = _records(ring_step, q, k, v)
    assert rec.status == "skipped" and rec.reason.startswith("ring attention")


def test_sharded_attention_without_all_to_all_is_skipped(one_rank_group):
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))

    def sharded(q, k, v):
        out = F.scaled_dot_product_attention(q, k, v)
        return funcol.all_reduce(out, "sum", one_rank_group)

    (rec,) = _records(sharded, q, k, v)
    assert rec.status == "skipped" and "do not all arrive through an all-to-all" in rec.reason
