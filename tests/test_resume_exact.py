"""A run killed with SIGKILL and resumed reproduces the uninterrupted run step for step."""
import json
import os
import signal
import subprocess
import sys
import time

import torch
from toydata import write_toy_shards

from clipalign import checkpoint as ckpt


def _command(data, out, steps):
    return [sys.executable, "-m", "clipalign", "train", "--data", str(data), "--out", str(out), "--model", "ca-nano",
            "--batch-size", "16", "--steps", str(steps), "--log-every", "1", "--checkpoint-every", "5",
            "--keep-checkpoints", "0", "--workers", "2", "--shuffle-buffer", "48", "--precision", "fp32",
            "--lr", "2e-3", "--warmup", "3", "--mlm-weight", "0.5", "--no-progress", "--no-tensorboard", "--resume"]


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _last_step(out):
    try:
        return _rows(out)[-1]["step"]
    except (FileNotFoundError, IndexError, json.JSONDecodeError):
        return 0


def test_sigkill_then_resume_reproduces_every_step(tmp_path):
    # a bad sample in the stream: skipped (and counted once) in both runs alike
    data = tmp_path / "shards"
    write_toy_shards(data, n=160, per_shard=32, empty_caption_keys=(7,))
    steps = 14
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    subprocess.run(_command(data, tmp_path / "straight", steps), check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    # its own process group: the kill takes the loader workers too, as killing a job does
    proc = subprocess.Popen(_command(data, killed, steps), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while _last_step(killed) < 7 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    interrupted_at = _last_step(killed)
    assert 7 <= interrupted_at < steps, "the run was not killed mid-way"
    assert ckpt.latest_checkpoint(killed).name == "step_00000005.pt"  # resumes mid-stream, on an odd step

    subprocess.run(_command(data, killed, steps), check=True, env=env, capture_output=True)
    straight, resumed = _rows(tmp_path / "straight"), _rows(killed)
    assert [r["step"] for r in resumed] == list(range(1, steps + 1))
    for a, b in zip(straight, resumed):
        for key in ("contrastive_loss", "mlm_loss", "mlm_acc", "lr", "logit_scale"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
    assert straight[-1]["skipped"] == resumed[-1]["skipped"]
    final_a = ckpt.load_checkpoint(tmp_path / "straight")["model"]
    final_b = ckpt.load_checkpoint(killed)["model"]
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
