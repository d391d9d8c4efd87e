"""A run killed with SIGKILL and resumed reproduces the uninterrupted run step for step."""
import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import torch
from toydata import write_toy_shards

from clipalign import checkpoint as ckpt
from clipalign.formats.folders import RunFolder

TRAIN_THEN_WAIT = str(Path(__file__).parent / "helpers" / "train_then_wait.py")
KILL_AT = 7  # two steps past the step-5 checkpoint: those two are run again after the resume


def _args(data, out, steps):
    return ["--data", str(data), "--out", str(out), "--model", "ca-nano", "--batch-size", "16", "--steps", str(steps),
            "--log-every", "1", "--checkpoint-every", "5", "--keep-checkpoints", "0", "--workers", "2",
            "--shuffle-buffer", "48", "--precision", "fp32", "--lr", "2e-3", "--warmup", "3", "--mlm-weight", "0.5",
            "--image-ssl", "none",  # the MLM's resume with loader workers; SimCLR's is in test_train_objectives
            "--no-progress", "--no-tensorboard", "--resume"]


def _rows(out):
    return [json.loads(line) for line in RunFolder(out).metrics.read_text().splitlines()]


def test_sigkill_then_resume_reproduces_every_step(tmp_path):
    # a bad sample in the stream: skipped (and counted once) in both runs alike
    data = tmp_path / "shards"
    write_toy_shards(data, n=160, per_shard=32, empty_caption_keys=(7,))
    steps = 14
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    train = [sys.executable, "-m", "clipalign", "train"]
    subprocess.run(train + _args(data, tmp_path / "straight", steps), check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    # It stops once step KILL_AT is logged and waits; its own process group, so that the kill
    # takes the loader workers too, as killing a job does.
    proc = subprocess.Popen([sys.executable, TRAIN_THEN_WAIT, str(KILL_AT), *_args(data, killed, steps)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        # (the timeout only guards against a hang: the child says its line at step KILL_AT)
        said = proc.stdout.readline() if select.select([proc.stdout], [], [], 300)[0] else ""
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert said.strip() == f"logged step {KILL_AT}", "the run ended before it was killed"
    assert [r["step"] for r in _rows(killed)] == list(range(1, KILL_AT + 1))
    assert ckpt.latest_checkpoint(killed).name == RunFolder(killed).checkpoint(5).name  # mid-stream, an odd step

    subprocess.run(train + _args(data, killed, steps), check=True, env=env, capture_output=True)
    straight, resumed = _rows(tmp_path / "straight"), _rows(killed)
    assert [r["step"] for r in resumed] == list(range(1, steps + 1))  # nothing lost or logged twice
    for a, b in zip(straight, resumed):
        for key in ("contrastive_loss", "mlm_loss", "mlm_acc", "lr", "logit_scale"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
    assert straight[-1]["skipped"] == resumed[-1]["skipped"]
    final_a = ckpt.load_checkpoint(tmp_path / "straight")["model"]
    final_b = ckpt.load_checkpoint(killed)["model"]
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
