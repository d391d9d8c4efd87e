"""Data parallel training with torchrun (gloo on this CPU): two ranks = one process on the same global batch."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from toydata import write_toy_shards

from clipalign import checkpoint as ckpt

HELPER = str(Path(__file__).parent / "helpers" / "dist_step.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.mark.parametrize("condition", ["none", "image"])  # the image-conditioned MLM head too
def test_two_ranks_give_the_loss_and_gradients_of_one_process(tmp_path, condition):
    subprocess.run([sys.executable, HELPER, str(tmp_path / "one.pt"), condition], check=True, capture_output=True)
    run = subprocess.run([*TORCHRUN, HELPER, str(tmp_path / "two.pt"), condition], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one["world_size"] == 1 and two["world_size"] == 2
    for key in ("contrastive_loss", "mlm_loss", "mlm_acc", "loss"):
        assert two["logs"][key] == pytest.approx(one["logs"][key], rel=1e-5), key
    assert one["grads"].keys() == two["grads"].keys() and len(one["grads"]) > 10
    assert any(n.startswith("mlm_fusion.") for n in one["grads"]) == (condition == "image")
    for name, grad in one["grads"].items():
        assert torch.allclose(two["grads"][name], grad, rtol=1e-4, atol=1e-6), name


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
