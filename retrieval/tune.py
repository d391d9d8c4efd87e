"""Recall against exact search, latency, and tuning a search parameter to a target recall.

Queries are rows of the collection itself; each query's own row is left out of both the
exact and the approximate answer, so recall@k measures finding the k nearest *other* vectors.
"""
from __future__ import annotations

import time
from typing import Any

import faiss
import numpy as np


def set_param(index: faiss.Index, param: str | None, value: int | None) -> None:
    """Set ``nprobe`` / ``efSearch`` on ``index`` (also through an OPQ pre-transform)."""
    if param and value:
        faiss.ParameterSpace().set_index_parameter(index, param, int(value))


def _drop_self(ids: np.ndarray, scores: np.ndarray, self_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    out_ids = np.full((len(ids), k), -1, np.int64)
    out_scores = np.full((len(ids), k), -np.inf, np.float32)
    for q, (row_i, row_s) in enumerate(zip(ids, scores)):
        keep = row_i != self_ids[q]
        got_i, got_s = row_i[keep][:k], row_s[keep][:k]
        out_ids[q, : len(got_i)], out_scores[q, : len(got_s)] = got_i, got_s
    return out_ids, out_scores


def exact_neighbours(vectors: np.ndarray, query_ids: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) ids of the exact top-``k`` inner products of ``vectors[query_ids]``, self excluded."""
    queries = np.ascontiguousarray(vectors[query_ids])
    scores, ids = faiss.knn(queries, np.ascontiguousarray(vectors), k + 1, metric=faiss.METRIC_INNER_PRODUCT)
    return _drop_self(ids, scores, query_ids, k)[0]


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / k, for (Q, k) id arrays."""
    k = truth.shape[1]
    return float(np.mean([len(set(f[f >= 0]) & set(t)) / k for f, t in zip(found, truth)]))


def measure(index: faiss.Index, queries: np.ndarray, query_ids: np.ndarray, truth: np.ndarray,
            timing: bool = True) -> dict[str, Any]:
    """Recall@k of ``index`` on (Q, D) ``queries`` against ``truth`` (Q, k), and its latency in ms."""
    k = truth.shape[1]
    t0 = time.perf_counter()
    scores, ids = index.search(queries, k + 1)
    batched = (time.perf_counter() - t0) * 1000 / len(queries)
    found = _drop_self(ids, scores, query_ids, k)[0]
    result: dict[str, Any] = {"recall": round(recall_at_k(found, truth), 4), "queries": len(queries)}
    if timing:
        single = []
        for q in queries[: min(len(queries), 200)]:
            t0 = time.perf_counter()
            index.search(q[None], k)
            single.append((time.perf_counter() - t0) * 1000)
        result["latency_ms"] = {"single_p50": round(float(np.percentile(single, 50)), 4),
                                "single_p99": round(float(np.percentile(single, 99)), 4),
                                "batched_per_query": round(batched, 4)}
    return result


def candidate_values(param: str, nlist: int) -> list[int]:
    if param == "nprobe":
        return sorted({min(2 ** i, nlist) for i in range(0, 17)})
    return [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024]  # efSearch


def tune(index: faiss.Index, param: str, nlist: int, queries: np.ndarray, query_ids: np.ndarray,
         truth: np.ndarray, target: float) -> tuple[int, dict[str, Any]]:
    """The smallest value of ``param`` whose recall reaches ``target`` (else the best value), set on ``index``.

    Returns:
        ``(value, measure(...) at that value)``; the measurement says ``"reached": False`` when
        no value reached ``target``.
    """
    best: tuple[float, int] = (-1.0, 0)
    for value in candidate_values(param, nlist):
        set_param(index, param, value)
        recall = measure(index, queries, query_ids, truth, timing=False)["recall"]
        if recall >= target:
            best = (recall, value)
            break
        if recall > best[0] + 1e-4:
            best = (recall, value)
    set_param(index, param, best[1])
    result = measure(index, queries, query_ids, truth)
    result["reached"] = result["recall"] >= target
    return best[1], result
