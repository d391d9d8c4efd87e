"""What a training run writes into its run folder, besides checkpoints: the lock, the config,
the metrics log, TensorBoard events and the summary.

The file names are ``clipalign.formats.folders.RunFolder``'s; ``clipalign.checkpoint`` writes
the checkpoints.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import time
from pathlib import Path
from typing import IO, Any

from clipalign.formats.atomic import replace_file, write_json
from clipalign.formats.folders import RunFolder


class RunLockedError(RuntimeError):
    """Another live process is training into the same run folder."""


def lock_run(run_dir: str | os.PathLike) -> IO[str]:
    """Hold an exclusive lock on the run folder's lock file while training.

    It is released when the returned file closes (or the process dies, so a killed run
    never leaves a stale lock behind); the file holds the holder's pid.

    Raises:
        RunLockedError: another process holds it.
    """
    handle = RunFolder(run_dir).lock.open("a+")  # not "w": that would wipe the holder's pid
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RunLockedError(f"another process is training into {run_dir}") from None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only the metrics lines (JSON objects with a ``step``) of steps up to ``step``."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        replace_file(path, lambda tmp: tmp.write_text("".join(kept)))


class StepTimes:
    """A run's throughput and wait for data: per logging window (``window``) and in all (``waited_s``)."""

    def __init__(self) -> None:
        self.waited_s = 0.0  # the whole run's seconds spent waiting for batches
        self._open()

    def _open(self) -> None:
        self._start, self._samples, self._steps, self._waited = time.perf_counter(), 0, 0, 0.0

    def step(self, samples: int, waited_s: float) -> None:
        """One step of ``samples`` (all ranks), whose batch took ``waited_s`` to arrive."""
        self._samples, self._steps, self._waited = self._samples + samples, self._steps + 1, self._waited + waited_s
        self.waited_s += waited_s

    def window(self) -> dict[str, float]:
        """``samples_per_s`` and ``data_wait_s`` (mean a step) since the window opened."""
        return {"samples_per_s": self._samples / (time.perf_counter() - self._start),
                "data_wait_s": self._waited / max(self._steps, 1)}

    def restart(self) -> None:
        """Open the next window now (time spent logging is not training time)."""
        self._open()


class RunWriter:
    """The writer of one run folder, for the one process (rank 0) that writes it.

    Use as a context manager: entering creates the folder and takes its lock (``RunLockedError``
    if taken), leaving closes the metrics log and TensorBoard and lets the lock go::

        with RunWriter(out, tensorboard=True) as run:
            ...  # load the checkpoint to resume from
            run.begin(asdict(cfg), step)
            run.log({"step": 1, "loss": 2.3})
            run.finish(summary)
    """

    def __init__(self, root: str | os.PathLike, tensorboard: bool = True):
        self.folder = RunFolder(root)
        self.tensorboard = tensorboard
        self._lock: IO[str] | None = None
        self._metrics: IO[str] | None = None
        self._tb: Any = None

    def __enter__(self) -> RunWriter:
        self.folder.root.mkdir(parents=True, exist_ok=True)
        self._lock = lock_run(self.folder.root)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def begin(self, config: dict[str, Any], step: int) -> None:
        """Write the config and open the metrics log at ``step``, the step training resumes from.

        Lines of steps after it (logged after the checkpoint resumed from, by a run killed
        between two checkpoints) are about to be run again: they are dropped.
        """
        truncate_metrics(self.folder.metrics, step)
        write_json(self.folder.config, config)
        self._metrics = self.folder.metrics.open("a")

    def log(self, record: dict[str, Any]) -> None:
        """Append one metrics line; its finite numbers also go to TensorBoard (``train/<key>``
        unless the key names its own section, as ``eval/<set>/<metric>`` does)."""
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        if not self.tensorboard:
            return
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events a killed run logged past this step are dropped, as its metrics lines are
            self._tb = SummaryWriter(str(self.folder.tensorboard), purge_step=record["step"])
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(key if "/" in key else f"train/{key}", value, record["step"])
        self._tb.flush()

    def finish(self, summary: dict[str, Any]) -> None:
        """Write the run's summary (what ``Trainer.fit`` returns)."""
        write_json(self.folder.summary, summary)

    def close(self) -> None:
        """Close TensorBoard, the metrics log and the lock (each once)."""
        handles = (self._tb, self._metrics, self._lock)
        self._tb = self._metrics = self._lock = None
        for handle in handles:
            if handle is not None:
                handle.close()
