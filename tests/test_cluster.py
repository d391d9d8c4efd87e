"""clipalign.cluster: Ray jobs in flight, bounded, their results in job order."""
from __future__ import annotations

import os
import time

import pytest

from clipalign.cluster import connect, ordered, stop_tasks


@pytest.mark.parametrize("address", ["127.0.0.1:1", "no-port"])
def test_connect_names_a_missing_cluster_at_once(address):  # first: before this module connects
    with pytest.raises(ConnectionError, match=address):
        connect(address)


@pytest.fixture(scope="module")
def ray(ray_cluster):
    ray = connect(ray_cluster)
    yield ray
    ray.shutdown()


def test_results_in_job_order_with_a_bounded_window(ray):
    @ray.remote
    def square(x: int) -> tuple[int, int]:
        return x * x, os.getpid()  # never this process: tasks run in the nodes' workers

    submitted: list[int] = []

    def submit(job: int):
        submitted.append(job)
        return None if job == 3 else square.remote(job)  # job 3 has nothing to do

    got = []
    for job, result in ordered(submit, range(8), in_flight=2):
        assert len(submitted) - len(got) <= 2  # never more than the window submitted and not taken
        got.append((job, result))
    assert [j for j, _ in got] == list(range(8))
    assert [r[0] if r else None for _, r in got] == [0, 1, 4, None, 16, 25, 36, 49]
    assert os.getpid() not in {r[1] for _, r in got if r}


def test_a_failed_task_raises_at_its_turn(ray):
    @ray.remote(max_retries=0)
    def check(x: int) -> int:
        if x == 2:
            raise ValueError("bad job")
        return x

    seen = []
    with pytest.raises(ray.exceptions.RayTaskError, match="bad job"):
        for job, result in ordered(check.remote, range(5), in_flight=3):
            seen.append(result)
    assert seen == [0, 1]  # the jobs before it were given back first


@pytest.mark.parametrize("stop", ["a failed task", "the caller"])
def test_tasks_in_flight_are_cancelled_when_the_run_stops(ray, stop, tmp_path):
    @ray.remote(max_retries=0)
    def job(x: int, gate: str) -> int:
        import pathlib
        import time

        if x == 0 and stop == "a failed task":
            raise ValueError("bad job")
        deadline = time.monotonic() + 120  # the others wait for a gate never opened: only a cancel ends them
        while x and not pathlib.Path(gate).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return x

    refs = []

    def submit(x: int):
        refs.append(job.remote(x, str(tmp_path / "gate")))
        return refs[-1]

    results = ordered(submit, range(4), in_flight=3)
    if stop == "a failed task":
        with pytest.raises(ray.exceptions.RayTaskError, match="bad job"):
            next(results)
    else:
        assert next(results) == (0, 0)
        results.close()  # the caller stops taking results
    assert len(refs) == 3  # job 3 was never submitted
    _, running = ray.wait(refs[1:], num_returns=2, timeout=0)
    assert not running  # the run's end waited for its tasks to end
    for ref in refs[1:]:  # cancelled; or killed, where Ray lost the cancel of a task just starting
        with pytest.raises((ray.exceptions.TaskCancelledError, ray.exceptions.WorkerCrashedError)):
            ray.get(ref, timeout=0)


def test_a_task_that_outlives_its_cancel_is_killed(ray, tmp_path):
    @ray.remote(max_retries=0)
    def stubborn(started: str, finished: str) -> None:
        import pathlib
        import time

        pathlib.Path(started).touch()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                time.sleep(0.05)
            except KeyboardInterrupt:  # what a graceful cancel raises: this task carries on
                pass
        pathlib.Path(finished).touch()

    started, finished = tmp_path / "started", tmp_path / "finished"
    ref = stubborn.remote(str(started), str(finished))
    deadline = time.monotonic() + 60
    while not started.exists():  # interrupt it running, not queued
        assert time.monotonic() < deadline, "the task never started"
        time.sleep(0.05)
    stop_tasks([ref], grace_s=1.0)
    assert ray.wait([ref], timeout=0)[0] == [ref]  # ended when stop_tasks returned: killed
    with pytest.raises((ray.exceptions.TaskCancelledError, ray.exceptions.WorkerCrashedError)):
        ray.get(ref, timeout=0)
    assert not finished.exists()
