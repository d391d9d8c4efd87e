"""What a run writes into its folder besides checkpoints: lock, config, metrics, TensorBoard, summary."""
import json
import os

import pytest

from clipalign.formats.folders import RunFolder
from clipalign.run_folder import RunLockedError, RunWriter, lock_run, truncate_metrics


def test_the_lock_holds_the_pid_and_is_taken_once(tmp_path):
    with lock_run(tmp_path):
        assert RunFolder(tmp_path).lock.read_text() == f"{os.getpid()}\n"
        with pytest.raises(RunLockedError, match="another process"):
            lock_run(tmp_path)
    lock_run(tmp_path).close()  # free once the holder lets go


def test_truncate_metrics_keeps_the_steps_up_to_the_resumed_one(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 4)))
    truncate_metrics(path, 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    truncate_metrics(tmp_path / "absent.jsonl", 2)  # nothing to do


def test_writer_lays_out_the_run_folder(tmp_path):
    run = RunFolder(tmp_path / "run")
    run.root.mkdir()
    run.metrics.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)))
    with RunWriter(run.root, tensorboard=False) as writer:
        with pytest.raises(RunLockedError):
            RunWriter(run.root).__enter__()
        writer.begin({"steps": 4}, step=2)  # resumed at step 2: step 3 is run again
        writer.log({"step": 3, "loss": 0.5})
        writer.log({"step": 4, "loss": float("nan")})
        writer.finish({"steps": 4})
    assert json.loads(run.config.read_text()) == {"steps": 4}
    rows = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[2]["loss"] == 0.5
    assert json.loads(run.summary.read_text()) == {"steps": 4}
    assert not run.tensorboard.exists()
    RunWriter(run.root).__enter__().close()  # the lock is free again


def test_tensorboard_gets_the_finite_numbers_of_each_line(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = RunFolder(tmp_path)
    with RunWriter(tmp_path) as writer:
        writer.begin({}, step=0)
        writer.log({"step": 1, "loss": 2.0, "eval/set/acc1": 0.5, "skipped": {"x": 1}, "bad": float("inf")})
    events = EventAccumulator(str(run.tensorboard))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"train/loss", "eval/set/acc1"}
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 2.0)]


def test_only_whole_step_names_are_checkpoints():
    from clipalign.formats.folders import RunFolder

    assert RunFolder.checkpoint_step("run/checkpoints/step_00000042.pt") == 42
    assert RunFolder.checkpoint_step(RunFolder("run").checkpoint(7)) == 7
    for name in ("xstep_1.pt", "step_1.pt.tmp", "step_.pt", ".step_1.pt", "step_1.ptx"):
        assert RunFolder.checkpoint_step(name) is None, name
