"""Ray for the stages that scale out (``--engine ray``): imported only when a run asks for it.

Local runs never import Ray, so it stays an extra (``pip install 'clipalign[ray]'``). The
stages submit their pure, idempotent jobs (a prep shard, an embedding chunk, an index part)
through ``ordered``, which keeps a bounded number in flight and gives results back in job
order, so a Ray run commits what it gets exactly as the local loop does.
"""
from __future__ import annotations

import socket
import warnings
from collections import deque
from types import ModuleType
from typing import Any, Callable, Iterable, Iterator, TypeVar

RAY_MISSING = "--engine ray needs Ray: pip install 'clipalign[ray]'"
# A task whose worker process or node dies is run again this many times (Ray's own retry).
MAX_RETRIES = 3
# Seconds a cancelled task has to end after its KeyboardInterrupt before its worker is killed.
CANCEL_GRACE_S = 10.0
FORCE_TRIES = 3

J = TypeVar("J")


def connect(address: str | None = None) -> ModuleType:
    """The ``ray`` module, connected to the cluster at ``address`` (``host:port``, ``auto``, or
    None: ``$RAY_ADDRESS`` if set, else a local Ray started for this process).

    Raises:
        RuntimeError: Ray is not installed (``RAY_MISSING``).
        ConnectionError: no cluster answers at ``address``.
    """
    try:
        import ray
    except ImportError as e:
        raise RuntimeError(RAY_MISSING) from e
    if not ray.is_initialized():
        if address not in (None, "auto", "local"):
            _check_reachable(address)  # Ray itself retries a dead address for minutes
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    return ray


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConnectionError(f"--ray-address {address!r}: expected HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConnectionError(f"no Ray cluster answers at {address} ({e.strerror or e})") from e


def ordered(submit: Callable[[J], Any], jobs: Iterable[J], in_flight: int) -> Iterator[tuple[J, Any]]:
    """``(job, result)`` in the order of ``jobs``, with at most ``in_flight`` submitted and not yet
    taken; ``submit(job)`` returns a Ray object ref (or None for a job with nothing to do, given
    back as its result). A task's error is raised when its turn comes, after the earlier ones;
    then, or when the caller stops taking results, the tasks still in flight are stopped
    (``stop_tasks``), so that none goes on writing for a run that has ended.
    """
    import ray

    if in_flight < 1:
        raise ValueError(f"in_flight must be >= 1, got {in_flight}")
    pending: deque[tuple[J, Any]] = deque()
    try:
        for job in jobs:
            pending.append((job, submit(job)))
            while len(pending) >= in_flight:
                done, ref = pending.popleft()
                yield done, None if ref is None else ray.get(ref)
        while pending:
            done, ref = pending.popleft()
            yield done, None if ref is None else ray.get(ref)
    finally:
        stop_tasks([ref for _, ref in pending if ref is not None])


def stop_tasks(refs: list[Any], grace_s: float = CANCEL_GRACE_S) -> None:
    """Cancel the tasks of ``refs`` and return once each has ended (finished, cancelled or
    killed), so that none goes on after its run.

    Ray's cancel is best-effort: a cancel that reaches a worker while it is still starting the
    task can be lost (ray-project/ray#24359), and a task can catch the ``KeyboardInterrupt``.
    So a task not ended ``grace_s`` after the interrupt is cancelled again with ``force=True``,
    which ends its worker process; after ``FORCE_TRIES`` of those, a warning names how many are left.
    """
    import ray

    for attempt in range(1 + FORCE_TRIES):
        if not refs:
            return
        for ref in refs:
            ray.cancel(ref, force=attempt > 0)  # a queued task never starts; a running one is interrupted
        _, refs = ray.wait(refs, num_returns=len(refs), timeout=grace_s)
    if refs:
        warnings.warn(f"{len(refs)} Ray task(s) still running after {FORCE_TRIES} forced cancels", stacklevel=2)
