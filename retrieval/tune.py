"""Recall against exact search, latency, and tuning a search parameter to a target recall.

Queries are rows of the collection itself; each query's own row is left out of both the
exact and the approximate answer, so recall@k measures finding the k nearest *other* vectors.
"""
from __future__ import annotations

import time
from typing import Any

import faiss
import numpy as np

K_FACTORS = (4, 8, 16, 32, 64, 128, 256, 512, 1024)  # re-ranking depths tried for a Refine index
TIMING_REPEATS = 3  # batched timings are the median of this many runs: the machine may be shared


def set_param(index: faiss.Index, param: str | None, value: int | None) -> None:
    """Set ``nprobe`` / ``efSearch`` / ``k_factor_rf`` on ``index`` (also through a pre-transform or a Refine)."""
    if param and value:
        faiss.ParameterSpace().set_index_parameter(index, param, int(value))


def set_params(index: faiss.Index, params: dict[str, int]) -> None:
    """Set every ``{name: value}`` of ``params`` on ``index``."""
    for name, value in params.items():
        set_param(index, name, value)


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
    scores, ids = index.search(queries, k + 1)
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
                                "batched_per_query": round(batched_ms(index, queries, k + 1), 4)}
    return result


def batched_ms(index: faiss.Index, queries: np.ndarray, k: int) -> float:
    """Milliseconds per query of one ``search`` over all (Q, D) ``queries``: after a warm-up, the median of a few runs."""
    index.search(queries[:10], k)
    runs = []
    for _ in range(TIMING_REPEATS):
        t0 = time.perf_counter()
        index.search(queries, k)
        runs.append((time.perf_counter() - t0) * 1000 / len(queries))
    return float(np.median(runs))


def candidate_values(param: str, nlist: int) -> list[int]:
    """Values of ``param`` to try, smallest first; for ``nprobe`` powers of two and the steps between (1, 2, 3, 4, 6, ...)."""
    if param == "nprobe":
        return sorted({min(v, nlist) for i in range(0, 17) for v in (2 ** i, 3 * 2 ** i // 2)})
    return [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024]  # efSearch


def _smallest(index: faiss.Index, param: str, values: list[int], queries: np.ndarray, query_ids: np.ndarray,
              truth: np.ndarray, target: float) -> tuple[int, float]:
    """``(value, recall)``: the first of ``values`` whose recall reaches ``target``, else the best one (set on ``index``)."""
    best: tuple[float, int] = (-1.0, values[0])
    for value in values:
        set_param(index, param, value)
        recall = measure(index, queries, query_ids, truth, timing=False)["recall"]
        if recall >= target:
            return value, recall
        if recall > best[0] + 1e-4:
            best = (recall, value)
    set_param(index, param, best[1])
    return best[1], best[0]


def tune(index: faiss.Index, param: str, nlist: int, queries: np.ndarray, query_ids: np.ndarray,
         truth: np.ndarray, target: float) -> tuple[int, dict[str, Any]]:
    """The smallest value of ``param`` whose recall reaches ``target`` (else the best value), set on ``index``.

    Returns:
        ``(value, measure(...) at that value)``; the measurement says ``"reached": False`` when
        no value reached ``target``.
    """
    value, _ = _smallest(index, param, candidate_values(param, nlist), queries, query_ids, truth, target)
    result = measure(index, queries, query_ids, truth)
    result["reached"] = result["recall"] >= target
    return value, result


def tune_refine(index: faiss.Index, nlist: int, queries: np.ndarray, query_ids: np.ndarray, truth: np.ndarray,
                target: float) -> tuple[dict[str, int], dict[str, Any]]:
    """``nprobe`` and re-ranking depth ``k_factor_rf`` of an IVF + Refine index: the fastest pair that reaches ``target``.

    For each k_factor in ``K_FACTORS`` the smallest nprobe that reaches the target is found
    (none when even the largest misses it), never above the previous depth's nprobe, until a
    deeper re-ranking no longer lowers nprobe. The pairs found are timed on the batched
    queries and the fastest is kept; when none reaches the target, the best recall is kept.

    Returns:
        ``({"nprobe": ..., "k_factor_rf": ...}, measure(...) at that pair)`` with ``"reached"``.
    """
    k = truth.shape[1]
    values = candidate_values("nprobe", nlist)
    reached: list[tuple[float, dict[str, int]]] = []
    best: tuple[float, dict[str, int]] = (-1.0, {})
    for k_factor in K_FACTORS:
        set_params(index, {"k_factor_rf": k_factor, "nprobe": values[-1]})
        recall = measure(index, queries, query_ids, truth, timing=False)["recall"]
        if recall < target:  # no nprobe reaches the target at this depth
            if recall > best[0] + 1e-4:
                best = (recall, {"nprobe": values[-1], "k_factor_rf": k_factor})
            continue
        nprobe, _ = _smallest(index, "nprobe", values, queries, query_ids, truth, target)
        if reached and nprobe == reached[-1][1]["nprobe"]:
            break  # deeper re-ranking at the same nprobe only costs time
        reached.append((batched_ms(index, queries, k + 1), {"nprobe": nprobe, "k_factor_rf": k_factor}))
        values = [v for v in values if v <= nprobe]
    params = min(reached, key=lambda r: r[0])[1] if reached else best[1]
    set_params(index, params)
    result = measure(index, queries, query_ids, truth)
    result["reached"] = result["recall"] >= target
    return params, result
