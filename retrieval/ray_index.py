"""Index building on a Ray cluster (``--engine ray``), for collections whose vectors outgrow one machine.

The driver plans each target as the local build does (``retrieval.faiss_parts.plan_target``: the
same index, training sample, tuning queries and parts), reads only the sample and the
queries, and trains the empty index. Each part is a Ray task that reads its own rows from the
embeddings folder (which every node must see), fills a copy of the empty index with them and
finds the queries' exact neighbours among them; the driver merges the parts in row order as
they come back (``retrieval.faiss_parts.merge_part``), a bounded number in flight, then tunes. The
merged index is the one the local build makes, byte for byte.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import faiss
import numpy as np

from retrieval.embeddings import Embeddings
from retrieval.faiss_parts import PART_ROWS, Filled, Parts, build_planned, fill_part, mergeable, plan_target


@contextlib.contextmanager
def task_errors() -> Iterator[None]:
    """Re-raise a Ray task's ``OSError``, ``ValueError`` or ``KeyError`` as itself (one line naming
    the file, as the local engine gives it), not wrapped in a ``RayTaskError`` whose first line
    names the task."""
    import ray

    try:
        yield
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, (OSError, ValueError, KeyError)):
            raise err.cause from None
        raise


def fill_rows(embeddings: Embeddings, target: str, start: int, stop: int, empty: np.ndarray, queries: np.ndarray,
              k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One part, as a Ray task runs it: ``fill_part`` over rows ``[start, stop)`` of ``target``,
    the part's index given back as ``faiss.serialize_index`` bytes."""
    index, scores, ids = fill_part(empty, embeddings.vectors(target, start, stop), start, queries, k)
    return faiss.serialize_index(index), scores, ids


def _parts_on_ray(task: Any, shared: Any, target: str, parts: list[tuple[int, int]], window: int) -> Parts:
    """``build_planned``'s ``fill``: the ``parts`` of ``target`` as ``task`` (``fill_rows`` made
    remote) runs them on the embeddings ``shared`` through the object store, in order."""
    import ray

    from clipalign.cluster import ordered

    def fill(empty: np.ndarray, queries: np.ndarray, k: int) -> Iterator[Filled]:
        empty_ref, queries_ref = ray.put(empty), ray.put(queries)  # once, not once per task

        def submit(part: tuple[int, int]) -> Any:
            return task.remote(shared, target, part[0], part[1], empty_ref, queries_ref, k)

        with task_errors():
            for part, (data, scores, ids) in ordered(submit, parts, window):
                yield part, (faiss.deserialize_index(data), scores, ids)

    return fill


def build_indexes_on_ray(embeddings: Embeddings, *, kind: str = "auto", max_memory: int = 4 << 30,
                         target_recall: float = 0.95, seed: int = 0, address: str | None = None,
                         part_rows: int = PART_ROWS, in_flight: int | None = None
                         ) -> tuple[dict[str, faiss.Index], dict[str, Any]]:
    """``retrieval.index.build_indexes`` over a complete embeddings folder, its parts filled on Ray.

    The driver holds the training sample, the tuning queries, the growing index and at most
    ``in_flight`` parts (default: two per CPU of the cluster), never all the vectors.

    Returns:
        ``(indexes, stats)``, both keyed by target, as ``build_indexes`` gives them.

    Raises:
        ValueError: fewer than 2 vectors, no index within the budget, or an HNSW index (its
            graph is built in one process: ``--engine local``).
        RuntimeError: Ray is not installed; ConnectionError: no cluster at ``address``.
    """
    from clipalign.cluster import MAX_RETRIES, connect

    n, dim, targets = embeddings.count, embeddings.dim, embeddings.targets
    if n < 2:
        raise ValueError("an index needs at least 2 vectors")
    plans = {t: plan_target(n, dim, max_memory // len(targets), kind=kind, seed=seed, part_rows=part_rows)
             for t in targets}
    if not all(mergeable(p.spec) for p in plans.values()):
        raise ValueError("an HNSW graph is built in one process: use --engine local, or another --index")
    ray = connect(address)
    task = ray.remote(max_retries=MAX_RETRIES)(fill_rows)
    window = in_flight or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    shared = ray.put(embeddings)
    indexes, stats = {}, {}
    for target, plan in plans.items():
        fill = _parts_on_ray(task, shared, target, plan.parts, window)
        sample, queries = embeddings.take(target, plan.train_ids), embeddings.take(target, plan.query_ids)
        indexes[target], stats[target] = build_planned(plan, sample, queries, fill, max_memory // len(targets),
                                                       target_recall=target_recall, seed=seed)
    return indexes, stats


__all__ = ["build_indexes_on_ray", "fill_rows", "task_errors"]
