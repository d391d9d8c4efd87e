"""FAISS indexes saved with their metadata, tuning results and the identity of the model that made them.

An index folder (its file names: ``clipalign.formats.folders.IndexFolder``) holds one FAISS
index per embedded target (``image``, and ``caption`` when captions were embedded), the
metadata table (Arrow IPC, memory-mapped on load; row i describes vector i of each), the
info (dim, count, model identity, per-target index type, search parameter, measured recall,
latency and memory), the weights queries are embedded with and, optionally, a traced text
tower (see ``retrieval.query_encoder``). ``retrieval.build`` writes whole folders.
Vectors are L2-normalised, so inner product is cosine similarity.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from clipalign.formats.atomic import replace_file, write_json
from clipalign.formats.folders import IndexFolder
from retrieval.choose import IndexSpec, choose_index
from retrieval.identity import check_model
from retrieval.tune import exact_neighbours, measure, set_params, tune, tune_refine

MMAP_ABOVE = 256 << 20  # index files larger than this are memory-mapped on load
OPQ_ROUNDS = 8


def build_faiss(vectors: np.ndarray, spec: IndexSpec, train_ids: np.ndarray) -> faiss.Index:
    """Train ``spec`` on ``vectors[train_ids]`` and add all (N, D) ``vectors``."""
    index = faiss.index_factory(vectors.shape[1], spec.factory, faiss.METRIC_INNER_PRODUCT)
    if spec.kind == "ivfpq":  # OPQ's defaults (50 rounds of PQ training) cost minutes for little recall
        opq = faiss.downcast_VectorTransform(faiss.downcast_index(index).chain.at(0))
        opq.niter, opq.niter_pq_0, opq.max_train_points = OPQ_ROUNDS, OPQ_ROUNDS, 64 * 1024
    if not index.is_trained:
        index.train(np.ascontiguousarray(vectors[np.sort(train_ids)]))
    for start in range(0, len(vectors), 100_000):
        index.add(np.ascontiguousarray(vectors[start : start + 100_000]))
    return index


def _split(n: int, spec: IndexSpec, n_queries: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(training-sample ids, held-out query ids): queries are never in the training sample."""
    order = rng.permutation(n)
    queries = order[: min(n_queries, max(n // 10, 1))]
    rest = order[len(queries):] if n > len(queries) * 2 else order
    want = max(64 * spec.nlist, 256 * 39 if spec.kind == "ivfpq" else 0, 10_000)
    return rest[: min(len(rest), want)], queries


def build_target(vectors: np.ndarray, budget: int, *, kind: str = "auto", target_recall: float = 0.95,
                 k: int = 10, n_queries: int = 500, seed: int = 0) -> tuple[faiss.Index, dict[str, Any]]:
    """Choose, train, fill and tune an index over (N, D) normalised float32 ``vectors``.

    Returns:
        ``(index, stats)``: stats hold the spec, the tuned parameter, the measured recall@k
        on held-out queries against exact search, latencies, memory and build time.
    """
    n, dim = vectors.shape
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    spec = choose_index(n, dim, budget, kind)
    rng = np.random.default_rng(seed)
    train_ids, query_ids = _split(n, spec, n_queries, rng)
    t0 = time.perf_counter()
    index = build_faiss(vectors, spec, train_ids)
    build_s = time.perf_counter() - t0
    k_eff = max(1, min(k, n - 1))
    truth = exact_neighbours(vectors, query_ids, k_eff)
    queries = np.ascontiguousarray(vectors[query_ids])
    params: dict[str, int] = {}
    if spec.refine:
        params, result = tune_refine(index, spec.nlist, queries, query_ids, truth, target_recall)
    elif spec.param:
        value, result = tune(index, spec.param, spec.nlist, queries, query_ids, truth, target_recall)
        params = {spec.param: value}
    else:
        result = measure(index, queries, query_ids, truth) | {"reached": True}
    stats = {"index_type": spec.kind, "factory": spec.factory, "search_param": params,
             f"recall@{k_eff}": result["recall"], "k": k_eff, "target_recall": target_recall,
             "target_reached": result["reached"], "latency_ms": result["latency_ms"],
             "memory_bytes": len(faiss.serialize_index(index)), "memory_budget": budget,
             "memory_estimate": spec.memory, "build_s": round(build_s, 2), "count_at_tuning": n,
             "tuning": {"queries": len(query_ids), "seed": seed, "train_sample": len(train_ids)}}
    return index, stats


def _save_metadata(path: Path, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa

    table = pa.Table.from_pylist(rows) if rows else pa.table({"key": pa.array([], pa.string())})

    def write(tmp: Path) -> None:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)

    replace_file(path, write)


@dataclass
class SearchIndex:
    """Indexes over the same collection, its metadata table and the folder's info."""

    indexes: dict[str, faiss.Index]  # "image" / "caption" → index
    table: Any  # pyarrow.Table, row i describes vector i
    info: dict[str, Any]
    folder: Path | None = None

    @property
    def dim(self) -> int:
        return int(self.info["dim"])

    @property
    def metadata(self) -> list[dict[str, Any]]:
        return self.table.to_pylist()

    def rows(self, ids: list[int]) -> list[dict[str, Any]]:
        # slices, not Table.take: take() imports pandas (~0.4 s of a cold search)
        return [self.table.slice(i, 1).to_pylist()[0] for i in ids]

    def check_model(self, identity: dict[str, str], dim: int) -> None:
        """Raise ``ModelMismatch`` unless queries from this model can search the index."""
        check_model(self.info.get("model_identity", {"name": self.info.get("model")}), identity, self.dim, dim)

    def search(self, queries: np.ndarray, k: int, target: str = "image") -> list[list[dict[str, Any]]]:
        """Top-``k`` hits per query row, best first: ``{"rank", "score", "id", **metadata}``.

        Args:
            queries: (Q, D) normalised query features from the index's model.
            target: ``"image"`` or ``"caption"``.
        """
        if target not in self.indexes:
            raise KeyError(f"this index has no {target!r} vectors (has: {', '.join(self.indexes)})")
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"query dimension {queries.shape[-1]} does not match the index's {self.dim}")
        scores, ids = self.indexes[target].search(np.ascontiguousarray(queries, dtype=np.float32), k)
        out = []
        for row_s, row_i in zip(scores, ids):
            keep = [(float(s), int(i)) for s, i in zip(row_s, row_i) if i >= 0]
            rows = self.rows([i for _, i in keep])
            out.append([{"rank": r + 1, "score": s, "id": i, **row} for r, ((s, i), row) in enumerate(zip(keep, rows))])
        return out


def build_indexes(vectors: dict[str, np.ndarray], n_rows: int, *, kind: str = "auto", max_memory: int = 4 << 30,
                  target_recall: float = 0.95, seed: int = 0) -> tuple[dict[str, faiss.Index], dict[str, Any]]:
    """Build and tune an index per target over its (N, D) vectors, in memory.

    ``max_memory`` is the budget of all targets together, shared evenly.

    Returns:
        ``(indexes, stats)``, both keyed by target.

    Raises:
        ValueError: the targets disagree in shape or with the ``n_rows`` metadata rows, fewer
            than 2 vectors, or no index fits the budget.
    """
    n, dim = next(iter(vectors.values())).shape
    if any(v.shape != (n, dim) for v in vectors.values()) or n_rows != n:
        raise ValueError("every target needs one (N, D) vector per metadata row")
    if n < 2:
        raise ValueError("an index needs at least 2 vectors")
    indexes, stats = {}, {}
    for name, v in vectors.items():
        indexes[name], stats[name] = build_target(v, max_memory // len(vectors), kind=kind,
                                                  target_recall=target_recall, seed=seed)
    return indexes, stats


def write_index(out: str | os.PathLike, indexes: dict[str, faiss.Index], stats: dict[str, Any],
                metadata: list[dict[str, Any]], info: dict[str, Any]) -> SearchIndex:
    """Write the indexes, their metadata and, last, the folder's info (``info`` plus what the
    indexes measure: dim, count, targets, per-target stats)."""
    folder = IndexFolder(out)
    folder.root.mkdir(parents=True, exist_ok=True)
    for name, index in indexes.items():
        replace_file(folder.faiss(name), lambda tmp, ix=index: faiss.write_index(ix, str(tmp)))
    _save_metadata(folder.metadata, metadata)
    first = next(iter(indexes.values()))
    info = {**info, "dim": first.d, "count": len(metadata), "metric": "inner_product", "targets": list(indexes),
            "indexes": stats, "index_type": stats["image" if "image" in stats else next(iter(stats))]["index_type"]}
    write_json(folder.info, info)
    return load_index(out, mmap=False)


def save_index(out: str | os.PathLike, vectors: dict[str, np.ndarray], metadata: list[dict[str, Any]],
               info: dict[str, Any], *, kind: str = "auto", max_memory: int = 4 << 30,
               target_recall: float = 0.95, seed: int = 0) -> SearchIndex:
    """Build an index per target over its (N, D) vectors and write the folder (``build_indexes``,
    then ``write_index``)."""
    indexes, stats = build_indexes(vectors, len(metadata), kind=kind, max_memory=max_memory,
                                   target_recall=target_recall, seed=seed)
    return write_index(out, indexes, stats, metadata, info)


def _read_faiss(path: Path, mmap: bool | None) -> faiss.Index:
    if mmap is None:
        mmap = path.stat().st_size > MMAP_ABOVE
    if mmap:
        try:
            return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError:  # index types without mmap support are read into memory
            pass
    return faiss.read_index(str(path))


def _read_metadata(folder: IndexFolder) -> Any:
    import pyarrow as pa

    if folder.metadata.is_file():  # memory-mapped: only the rows of the hits are ever read
        return pa.ipc.open_file(pa.memory_map(str(folder.metadata))).read_all()
    with folder.legacy_metadata.open() as f:  # folders written before the Arrow table
        return pa.Table.from_pylist([json.loads(line) for line in f])


def load_index(folder: str | os.PathLike, mmap: bool | None = None) -> SearchIndex:
    """Read an index folder, memory-mapping large index files (``mmap=None``) or as told.

    Raises:
        FileNotFoundError: not an index folder, naming what is missing.
        ValueError: the files disagree with each other.
    """
    layout = IndexFolder(folder)
    if not layout.info.is_file():
        raise FileNotFoundError(f"not an index folder (no {layout.info})")
    info = json.loads(layout.info.read_text())
    indexes = {}
    for t in info["targets"]:
        indexes[t] = _read_faiss(layout.faiss(t), mmap)
        set_params(indexes[t], info.get("indexes", {}).get(t, {}).get("search_param", {}))
    table = _read_metadata(layout)
    for name, index in indexes.items():
        if index.ntotal != table.num_rows or index.d != info["dim"]:
            raise ValueError(f"{layout.root}: {layout.faiss(name).name} does not match the metadata / {layout.info.name}")
    return SearchIndex(indexes, table, info, layout.root)


def add_to_index(folder: str | os.PathLike, vectors: dict[str, np.ndarray], metadata: list[dict[str, Any]]) -> SearchIndex:
    """Append vectors (one (M, D) array per target of the index) and their metadata rows.

    The index keeps its trained quantizers and tuned parameter; its info records the
    count the recall was measured at (``count_at_tuning``) beside the new ``count``.
    """
    import pyarrow as pa

    index = load_index(folder, mmap=False)
    if set(vectors) != set(index.indexes):
        raise ValueError(f"the index has targets {sorted(index.indexes)}, the new embeddings {sorted(vectors)}")
    m = len(metadata)
    for name, v in vectors.items():
        if v.shape != (m, index.dim):
            raise ValueError(f"new {name} vectors have shape {v.shape}, the index needs ({m}, {index.dim})")
    layout = IndexFolder(folder)
    for name, v in vectors.items():
        index.indexes[name].add(np.ascontiguousarray(v, dtype=np.float32))
        replace_file(layout.faiss(name), lambda tmp, ix=index.indexes[name]: faiss.write_index(ix, str(tmp)))
    table = pa.concat_tables([index.table, pa.Table.from_pylist(metadata).cast(index.table.schema)])
    _save_metadata(layout.metadata, table.to_pylist())
    write_json(layout.info, {**index.info, "count": table.num_rows})
    return load_index(folder, mmap=False)


__all__ = ["SearchIndex", "add_to_index", "build_indexes", "build_target", "load_index", "save_index", "write_index"]
