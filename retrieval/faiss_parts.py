"""One FAISS index built in parts: trained once on a sample, then each part of ``PART_ROWS``
rows added to a copy of the empty trained index on its own, and the parts merged in row order
(``fill_part``, ``merge_part``), the result the same as one index filled whole; then tuned to
the target recall (``retrieval.tune``). ``retrieval.index`` fills the parts in turn,
``retrieval.ray_index`` as Ray tasks.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import faiss
import numpy as np

from retrieval.choose import IndexSpec, choose_index
from retrieval.tune import measure, tune, tune_refine

OPQ_ROUNDS = 8
ADD_ROWS = 100_000  # vectors added to a FAISS index per call
PART_ROWS = 100_000  # rows of one part: filled alone (in a Ray task, or in turn here), then merged in row order


def trained_index(sample: np.ndarray, spec: IndexSpec) -> faiss.Index:
    """An empty ``spec`` index trained on the (S, D) ``sample`` (nothing to train for a flat one)."""
    index = faiss.index_factory(sample.shape[1], spec.factory, faiss.METRIC_INNER_PRODUCT)
    if spec.kind == "ivfpq":  # OPQ's defaults (50 rounds of PQ training) cost minutes for little recall
        opq = faiss.downcast_VectorTransform(faiss.downcast_index(index).chain.at(0))
        opq.niter, opq.niter_pq_0, opq.max_train_points = OPQ_ROUNDS, OPQ_ROUNDS, 64 * 1024
    if not index.is_trained:
        index.train(np.ascontiguousarray(sample))
    return index


def mergeable(spec: IndexSpec) -> bool:
    """Whether parts of a ``spec`` index filled apart merge into the index filled whole: not an
    HNSW graph, whose links depend on every vector added before."""
    return spec.kind != "hnsw"


def fill_part(empty: np.ndarray, vectors: np.ndarray, start: int, queries: np.ndarray, k: int
              ) -> tuple[faiss.Index, np.ndarray, np.ndarray]:
    """Fill one part: the trained ``empty`` index (``faiss.serialize_index``'s bytes) with the
    (M, D) ``vectors`` of rows ``start...``, and the exact top-``k`` of the (Q, D) ``queries``
    among them (the tuning's ground truth, merged over the parts).

    Returns:
        ``(the part's index, scores (Q, k), row ids (Q, k); -1 past the part's rows)``.
    """
    index = faiss.deserialize_index(empty)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    for at in range(0, len(vectors), ADD_ROWS):
        index.add(vectors[at : at + ADD_ROWS])
    scores, ids = faiss.knn(queries, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)
    return index, scores, np.where(ids >= 0, ids + start, -1)


def merge_part(into: faiss.Index, part: faiss.Index, start: int) -> None:
    """Append ``part`` (the rows from ``start`` on, filled by ``fill_part``) to ``into``, which
    holds the rows before; the result equals one index filled with all of them in order."""
    a, b = faiss.downcast_index(into), faiss.downcast_index(part)
    if isinstance(a, faiss.IndexRefine):  # FAISS merges neither refining index: merge their two halves
        merge_part(a.base_index, b.base_index, start)
        merge_part(a.refine_index, b.refine_index, start)
        a.ntotal += b.ntotal
    elif isinstance(a, faiss.IndexFlatCodes):  # ids are positions: in row order they come out right
        a.merge_from(b)
    else:  # IVF, also behind a pre-transform: the part's ids 0.. become start..
        a.merge_from(b, start)


def clear_padding(index: faiss.Index) -> None:
    """Zero the unused slots of each inverted list's last block of a fast-scan index after merges.

    FAISS's merge leaves them as the allocator gave them (its adds write zero codes there): never
    read by a search, but the file would differ from run to run and from the index filled whole.
    """
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexRefine):
        return clear_padding(index.base_index)
    if isinstance(index, faiss.IndexPreTransform):
        return clear_padding(index.index)
    if not isinstance(index, faiss.IndexIVF):
        return None
    lists = faiss.downcast_InvertedLists(index.invlists)
    if not isinstance(lists, faiss.BlockInvertedLists):
        return None
    packer, zero = lists.packer, np.zeros(lists.packer.code_size, np.uint8)
    for list_no in range(lists.nlist):
        n = lists.list_size(list_no)
        if n % packer.nvec:
            blocks = -(-n // packer.nvec)
            codes = faiss.rev_swig_ptr(lists.get_codes(list_no), blocks * packer.block_size)
            last = codes[(blocks - 1) * packer.block_size:]
            for slot in range(n % packer.nvec, packer.nvec):
                packer.pack_1_c(faiss.swig_ptr(zero), slot, faiss.swig_ptr(last))
    return None


def _split(n: int, spec: IndexSpec, n_queries: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(training-sample ids, held-out query ids): queries are never in the training sample."""
    order = rng.permutation(n)
    queries = order[: min(n_queries, max(n // 10, 1))]
    rest = order[len(queries):] if n > len(queries) * 2 else order
    want = max(64 * spec.nlist, 256 * 39 if spec.kind == "ivfpq" else 0, 10_000)
    return rest[: min(len(rest), want)], queries


@dataclass(frozen=True)
class TargetPlan:
    """What a target's build is decided from its size alone: the index, its training sample, the
    held-out tuning queries and the parts it is filled in."""

    spec: IndexSpec
    train_ids: np.ndarray  # sorted
    query_ids: np.ndarray
    k: int  # the recall@k tuned for
    parts: list[tuple[int, int]]  # [start, stop) row ranges, in order


def plan_target(n: int, dim: int, budget: int, *, kind: str = "auto", k: int = 10, n_queries: int = 500,
                seed: int = 0, part_rows: int = PART_ROWS) -> TargetPlan:
    """The plan of an index over ``n`` vectors of ``dim`` within ``budget`` bytes (``choose_index``)."""
    spec = choose_index(n, dim, budget, kind)
    train_ids, query_ids = _split(n, spec, n_queries, np.random.default_rng(seed))
    step = part_rows if mergeable(spec) else n
    return TargetPlan(spec, np.sort(train_ids), query_ids, max(1, min(k, n - 1)),
                      [(a, min(a + step, n)) for a in range(0, n, step)])


Filled = tuple[tuple[int, int], tuple[faiss.Index, np.ndarray, np.ndarray]]  # ((start, stop), fill_part's result)
Parts = Callable[[np.ndarray, np.ndarray, int], Iterable[Filled]]


def build_planned(plan: TargetPlan, sample: np.ndarray, queries: np.ndarray, fill: Parts, budget: int, *,
                  target_recall: float = 0.95, seed: int = 0) -> tuple[faiss.Index, dict[str, Any]]:
    """Train, fill and tune the index of ``plan``.

    Args:
        sample: the (S, D) vectors of ``plan.train_ids``; queries: the (Q, D) of ``plan.query_ids``.
        fill: ``fill(empty index bytes, queries, k + 1)`` runs ``fill_part`` over ``plan.parts``
            (here in turn, or as Ray tasks) and yields ``((start, stop), its result)`` in order.

    Returns:
        ``(index, stats)``: as ``build_target``.
    """
    spec, k = plan.spec, plan.k
    t0 = time.perf_counter()
    empty = faiss.serialize_index(trained_index(sample, spec))
    index, truth = None, faiss.ResultHeap(len(queries), k + 1, keep_max=True)
    for (start, _), (part, scores, ids) in fill(empty, queries, k + 1):
        if index is None:
            index = part
        else:
            merge_part(index, part, start)
        truth.add_result(scores, ids)
    if len(plan.parts) > 1:
        clear_padding(index)
    build_s = time.perf_counter() - t0
    truth.finalize()
    truth_ids = np.array([[i for i in row if i != q][:k] for row, q in zip(truth.I, plan.query_ids)], np.int64)
    params: dict[str, int] = {}
    if spec.refine:
        params, result = tune_refine(index, spec.nlist, queries, plan.query_ids, truth_ids, target_recall)
    elif spec.param:
        value, result = tune(index, spec.param, spec.nlist, queries, plan.query_ids, truth_ids, target_recall)
        params = {spec.param: value}
    else:
        result = measure(index, queries, plan.query_ids, truth_ids) | {"reached": True}
    stats = {"index_type": spec.kind, "factory": spec.factory, "search_param": params,
             f"recall@{k}": result["recall"], "k": k, "target_recall": target_recall,
             "target_reached": result["reached"], "latency_ms": result["latency_ms"],
             "memory_bytes": len(faiss.serialize_index(index)), "memory_budget": budget,
             "memory_estimate": spec.memory, "build_s": round(build_s, 2), "count_at_tuning": index.ntotal,
             "tuning": {"queries": len(plan.query_ids), "seed": seed, "train_sample": len(plan.train_ids)}}
    return index, stats


def build_target(vectors: np.ndarray, budget: int, *, kind: str = "auto", target_recall: float = 0.95,
                 k: int = 10, n_queries: int = 500, seed: int = 0, part_rows: int = PART_ROWS
                 ) -> tuple[faiss.Index, dict[str, Any]]:
    """Choose, train, fill and tune an index over (N, D) normalised float32 ``vectors``, in memory.

    Returns:
        ``(index, stats)``: stats hold the spec, the tuned parameter, the measured recall@k
        on held-out queries against exact search, latencies, memory and build time.
    """
    n, dim = vectors.shape
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    plan = plan_target(n, dim, budget, kind=kind, k=k, n_queries=n_queries, seed=seed, part_rows=part_rows)

    def fill(empty: np.ndarray, queries: np.ndarray, kk: int) -> Iterator[Filled]:
        return (((a, b), fill_part(empty, vectors[a:b], a, queries, kk)) for a, b in plan.parts)

    return build_planned(plan, vectors[plan.train_ids], np.ascontiguousarray(vectors[plan.query_ids]), fill, budget,
                         target_recall=target_recall, seed=seed)
