"""Data parallel training with torchrun (gloo on this CPU): two ranks = one process on the same global batch."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from toydata import write_toy_shards

from clipalign import checkpoint as ckpt
from tests.helpers.dist_step import one_step

HELPER = str(Path(__file__).parent / "helpers" / "dist_step.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
CONDITIONS = ("none", "image")  # the image-conditioned MLM head too
# One thread a rank: torch's multi-threaded reductions may sum in another order from run to run.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    """Rank 0's step under ``torchrun --nproc_per_node 2``, for each MLM condition: one launch."""
    out = tmp_path_factory.mktemp("two_ranks") / "two.pt"
    run = subprocess.run([*TORCHRUN, HELPER, str(out), *CONDITIONS], capture_output=True, text=True, env=ONE_THREAD)
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize("condition", CONDITIONS)
def test_two_ranks_give_the_loss_and_gradients_of_one_process(two_ranks, condition):
    one, two = one_step(condition), two_ranks[condition]  # the whole batch in this process
    assert one["world_size"] == 1 and two["world_size"] == 2
    for key in ("contrastive_loss", "mlm_loss", "mlm_acc", "loss"):
        assert two["logs"][key] == pytest.approx(one["logs"][key], rel=1e-5), key
    assert one["grads"].keys() == two["grads"].keys() and len(one["grads"]) > 10
    assert any(n.startswith("mlm_fusion.") for n in one["grads"]) == (condition == "image")
    for name, grad in one["grads"].items():
        assert torch.allclose(two["grads"][name], grad, rtol=1e-4, atol=1e-6), name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_of_one_process_equal_one_node_of_two(two_ranks, tmp_path):
    """Two torchrun agents meeting by c10d rendezvous on 127.0.0.1, as two machines would."""
    nodes = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
             "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{_free_port()}", "--rdzv_id", "two-nodes",
             "--local_addr", "127.0.0.1", HELPER, str(tmp_path / "two_nodes.pt")]
    agents = [subprocess.Popen(nodes, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ONE_THREAD)
              for _ in range(2)]
    errors = [agent.communicate(timeout=300)[1] for agent in agents]
    assert [a.returncode for a in agents] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    one, two = two_ranks["none"], torch.load(tmp_path / "two_nodes.pt")["none"]
    assert one["world_size"] == two["world_size"] == 2
    assert two["logs"] == one["logs"]
    assert one["grads"].keys() == two["grads"].keys()
    for name, grad in one["grads"].items():  # the same ranks and the same all-reduce: bit for bit
        assert torch.equal(two["grads"][name], grad), name


def test_torchrun_trains_through_the_cli_and_checkpoints_every_ranks_stream(tmp_path):
    data = tmp_path / "shards"
    write_toy_shards(data, n=64, per_shard=32)
    run = subprocess.run([*TORCHRUN, "-m", "clipalign", "train", "--data", str(data), "--out", str(tmp_path / "run"),
                          "--model", "ca-nano", "--batch-size", "8", "--steps", "3", "--log-every", "1",
                          "--workers", "0", "--shuffle-buffer", "16", "--no-progress", "--no-tensorboard"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # rank 0 alone writes the log
    state = ckpt.load_checkpoint(tmp_path / "run")
    positions = state["data"]["positions"]
    assert len(positions) == 2 and all(p["step"] == 3 for p in positions)
