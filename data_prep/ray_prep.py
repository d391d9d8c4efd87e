"""Shard jobs on a Ray cluster (``clipalign prep --engine ray``).

One Ray task per shard job runs ``shard_plan.run_job``: it reads its rows (or gets them from the
driver), builds the shard's temporary tar in the output folder, which every node must see at
the same path, and hands back its rows. A task whose worker process or node dies is run again
(``clipalign.cluster.MAX_RETRIES`` times): a job is pure and writes only its own temporary
file, so a rerun gives the same result. The driver takes the results in shard order, at most
two per cluster CPU in flight, and commits them exactly as the local loop does.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

from clipalign.cluster import MAX_RETRIES, connect, ordered
from data_prep.shard_job import ShardResult, shard_name
from data_prep.shard_plan import ShardJob, run_job
from data_prep.sample import SampleConfig

IN_FLIGHT_PER_CPU = 2  # a shard queued behind each running one, so no CPU waits for the driver


class ClusterError(RuntimeError):
    """A shard's task failed on the cluster for a reason of the cluster's (its retries spent)."""


def ray_results(
    plan: Iterable[tuple[int, ShardJob | None]], out_dir: Path, config: SampleConfig, threads: int,
    address: str | None = None,
) -> Iterator[tuple[int, ShardJob | None, ShardResult | None]]:
    """``(shard id, job, result)`` in shard order; no result where there is no job.

    Args:
        plan: ``(shard id, job or None)`` in shard order (``shard_plan.plan_jobs``).
        out_dir: The output folder, on a filesystem every node shares.
        config: How each record becomes a sample.
        threads: Images each task reads or downloads at once.
        address: The cluster (``host:port``, ``auto``; None: ``$RAY_ADDRESS`` or a local Ray).

    Raises:
        RuntimeError: Ray is not installed (``clipalign.cluster.RAY_MISSING``).
        ConnectionError: no cluster answers at ``address``.
        ClusterError: a task's worker or node died more than ``MAX_RETRIES`` times.
        Exception: what a task raised (an ``OSError`` for a full disk, ...), as it raised it.
    """
    ray = connect(address)
    # One CPU a task: it encodes on one thread (its downloads wait in libcurl, off the CPU).
    task = ray.remote(num_cpus=1, max_retries=MAX_RETRIES)(run_job)
    in_flight = IN_FLIGHT_PER_CPU * max(1, int(ray.cluster_resources().get("CPU", 1)))

    def submit(item: tuple[int, ShardJob | None]):
        _, job = item
        return None if job is None else task.remote(job, str(out_dir), config, threads, 1)

    shard_id = -1
    try:
        for (shard_id, job), result in ordered(submit, plan, in_flight):
            yield shard_id, job, result
    except ray.exceptions.RayTaskError as err:
        raise err.cause if isinstance(err.cause, Exception) else ClusterError(str(err)) from None
    except ray.exceptions.RayError as err:
        raise ClusterError(f"shard {shard_name(shard_id + 1)}: {type(err).__name__} "
                           f"(its task was tried {MAX_RETRIES + 1} times)") from None
