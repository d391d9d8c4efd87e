"""FAISS indexes saved with their metadata, tuning results and the identity of the model that made them.

An index folder (its file names: ``clipalign.formats.folders.IndexFolder``) holds one FAISS
index per embedded target (``image``, and ``caption`` when captions were embedded), the
metadata table (Arrow IPC, memory-mapped on load; row i describes vector i of each), the
info (dim, count, model identity, per-target index type, search parameter, measured recall,
latency and memory), the weights queries are embedded with and, optionally, the text tower
as ONNX (see ``retrieval.query_encoder``). ``retrieval.build`` writes whole folders.
Vectors are L2-normalised, so inner product is cosine similarity.

An index is built in parts: trained once on a sample, then each part of ``PART_ROWS`` rows
is added to a copy of the empty trained index on its own and the parts are merged in row
order (``fill_part``, ``merge_part``), the result the same as one index filled whole. Here
the parts are filled in turn; ``retrieval.ray_index`` fills the same parts as Ray tasks.

Nothing in a folder is trusted on load: the info records each file's size and sha256
(``retrieval.identity.file_digest``) and names no file but the folder's own; a folder is
written whole in a temporary sibling and swapped into place (``retrieval.atomic_folder``).
"""
from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import faiss
import numpy as np

from clipalign.formats.atomic import replace_file, write_json
from clipalign.formats.folders import IndexFolder
from retrieval.atomic_folder import pinned_folder, recover, replaced_folder, swapped
from retrieval.choose import IndexSpec, choose_index
from retrieval.identity import check_digest, check_model, file_digest
from retrieval.tune import measure, set_params, tune, tune_refine

MMAP_ABOVE = 256 << 20  # index files larger than this are memory-mapped on load
OPQ_ROUNDS = 8
FILES = "files"  # the info's record of each file it describes: {file name: file_digest}
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


def _save_metadata(path: Path, rows: list[dict[str, Any]] | Iterable[Any]) -> int:
    """Write the metadata table from its rows, or from ``pyarrow.Table`` parts written one after
    another (never all in memory: an embeddings folder's units); returns its row count.

    Raises:
        ValueError: a part whose columns do not cast to the first part's.
    """
    import pyarrow as pa

    if isinstance(rows, list):
        table = pa.Table.from_pylist(rows) if rows else pa.table({"key": pa.array([], pa.string())})
        parts: Iterator[Any] = iter([table])
    else:
        parts = iter(rows)
    first = next(parts)
    count = 0

    def write(tmp: Path) -> None:
        nonlocal count
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, first.schema) as writer:
            for table in itertools.chain([first], parts):
                writer.write_table(table.cast(first.schema))
                count += table.num_rows

    replace_file(path, write)
    return count


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
            k: at most this many hits; more than the index holds is all of them (FAISS
                would allocate (Q, k) results whatever the index's size).
            target: ``"image"`` or ``"caption"``.
        """
        if target not in self.indexes:
            raise KeyError(f"this index has no {target!r} vectors (has: {', '.join(self.indexes)})")
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"query dimension {queries.shape[-1]} does not match the index's {self.dim}")
        if k < 1:
            raise ValueError("k must be positive")
        k = min(k, self.indexes[target].ntotal)
        if k == 0:
            return [[] for _ in range(len(queries))]
        scores, ids = self.indexes[target].search(np.ascontiguousarray(queries, dtype=np.float32), k)
        out = []
        for row_s, row_i in zip(scores, ids):
            keep = [(float(s), int(i)) for s, i in zip(row_s, row_i) if i >= 0]
            rows = self.rows([i for _, i in keep])
            out.append([{"rank": r + 1, "score": s, "id": i, **row} for r, ((s, i), row) in enumerate(zip(keep, rows))])
        return out


def build_indexes(vectors: dict[str, np.ndarray], n_rows: int, *, kind: str = "auto", max_memory: int = 4 << 30,
                  target_recall: float = 0.95, seed: int = 0, part_rows: int = PART_ROWS
                  ) -> tuple[dict[str, faiss.Index], dict[str, Any]]:
    """Build and tune an index per target over its (N, D) vectors, in memory.

    ``max_memory`` is the budget of all targets together, shared evenly; ``part_rows`` as
    ``plan_target`` (``retrieval.ray_index`` fills the same parts on a cluster).

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
                                                  target_recall=target_recall, seed=seed, part_rows=part_rows)
    return indexes, stats


def write_index(out: str | os.PathLike, indexes: dict[str, faiss.Index], stats: dict[str, Any],
                metadata: list[dict[str, Any]] | Iterable[Any], info: dict[str, Any]) -> dict[str, Any]:
    """Write the indexes, their metadata (rows, or ``pyarrow.Table`` parts in row order) and, last,
    the folder's info into ``out``, a folder being written (see ``save_index``, ``retrieval.build``):
    ``info`` plus what the indexes measure (dim, count, targets, per-target stats) and the record
    of every file (a model copy and text tower already there included). Returns that info.

    Raises:
        ValueError: the metadata's rows are not one per vector.
    """
    folder = IndexFolder(out)
    folder.root.mkdir(parents=True, exist_ok=True)
    for name, index in indexes.items():
        replace_file(folder.faiss(name), lambda tmp, ix=index: faiss.write_index(ix, str(tmp)))
    written = _save_metadata(folder.metadata, metadata)
    count = len(metadata) if isinstance(metadata, list) else written
    first = next(iter(indexes.values()))
    if any(ix.ntotal != count for ix in indexes.values()):
        raise ValueError(f"{count} metadata rows for {first.ntotal} vectors")
    info = {**info, "dim": first.d, "count": count, "metric": "inner_product", "targets": list(indexes),
            "indexes": stats, "index_type": stats["image" if "image" in stats else next(iter(stats))]["index_type"]}
    return _write_info(folder, info)


def _write_info(folder: IndexFolder, info: dict[str, Any]) -> dict[str, Any]:
    files = [folder.faiss(t) for t in info["targets"]] + [folder.metadata, folder.model, folder.text_query]
    info = {**info, FILES: {f.name: file_digest(f) for f in files if f.is_file()}}
    write_json(folder.info, info)
    return info


def save_index(out: str | os.PathLike, vectors: dict[str, np.ndarray], metadata: list[dict[str, Any]],
               info: dict[str, Any], *, kind: str = "auto", max_memory: int = 4 << 30,
               target_recall: float = 0.95, seed: int = 0) -> SearchIndex:
    """Build an index per target over its (N, D) vectors and write the folder ``out`` whole
    (``build_indexes``, then ``write_index`` into a sibling swapped into place).

    Raises:
        ValueError: as ``build_indexes``; ``out`` is a folder of something else.
    """
    indexes, stats = build_indexes(vectors, len(metadata), kind=kind, max_memory=max_memory,
                                   target_recall=target_recall, seed=seed)
    with replaced_folder(out, IndexFolder(out).info.name) as tmp:
        write_index(tmp, indexes, stats, metadata, info)
    return load_index(out, mmap=False)


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


def _check_own_files(layout: IndexFolder, info: dict[str, Any]) -> None:
    """Refuse an info that names a file to query with other than the folder's own: queries read
    only the folder's files (a model from elsewhere is passed explicitly: ``--checkpoint``)."""
    named = {"checkpoint": (info.get("checkpoint"), layout.model.name),  # older folders named their model copy
             "text_query.file": ((info.get("text_query") or {}).get("file"), layout.text_query.name)}
    older = {"text_query.file": layout.legacy_text_query.name}  # named by older folders, never read
    for field, (value, own) in named.items():
        if value is not None and value not in (own, older.get(field)):
            raise ValueError(f"{layout.info} names {value!r} as its {field}; an index folder is queried with its "
                             f"own {own} only (give --checkpoint to query with another model)")


def load_index(folder: str | os.PathLike, mmap: bool | None = None) -> SearchIndex:
    """Read an index folder, memory-mapping large index files (``mmap=None``) or as told.

    Every file the info records must be the one recorded (``retrieval.identity.check_digest``).
    The reads go through one pinned folder: a write swapped in meanwhile is never mixed in,
    the new version is read afresh instead. A missing folder that a write killed mid-swap set
    aside is put back first (``retrieval.atomic_folder.recover``).

    Raises:
        FileNotFoundError: not an index folder, naming what is missing.
        ValueError: the files disagree with each other or with the info's record of them.
    """
    layout = IndexFolder(folder)
    if not layout.info.is_file():
        recover(layout.root)
    for _ in range(2):  # a write swapped in while this read: read the new version
        with pinned_folder(layout.root) as root:
            try:
                return _load_pinned(layout, IndexFolder(root), mmap)
            except (OSError, ValueError):
                if not swapped(root, layout.root):
                    raise
    with pinned_folder(layout.root) as root:
        return _load_pinned(layout, IndexFolder(root), mmap)


def _load_pinned(layout: IndexFolder, pinned: IndexFolder, mmap: bool | None) -> SearchIndex:
    if not pinned.info.is_file():
        raise FileNotFoundError(f"not an index folder (no {layout.info})")
    try:
        info = json.loads(pinned.info.read_text())
        targets, dim = list(info["targets"]), int(info["dim"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{layout.info} is not an index's info ({type(err).__name__}: {err})") from None
    _check_own_files(layout, info)
    record = info.get(FILES, {})
    indexes = {}
    for t in targets:
        if not isinstance(t, str) or os.path.basename(t) != t or t.startswith("."):
            raise ValueError(f"{layout.info} names a target {t!r} that is not a file of the folder")
        if not pinned.faiss(t).is_file():
            raise FileNotFoundError(f"{layout.faiss(t)} is missing")
        check_digest(pinned.faiss(t), record.get(pinned.faiss(t).name), layout.info.name, layout.faiss(t))
        indexes[t] = _read_faiss(pinned.faiss(t), mmap)
        set_params(indexes[t], info.get("indexes", {}).get(t, {}).get("search_param", {}))
    if pinned.metadata.is_file():
        check_digest(pinned.metadata, record.get(pinned.metadata.name), layout.info.name, layout.metadata)
    elif not pinned.legacy_metadata.is_file():
        raise FileNotFoundError(f"{layout.metadata} is missing")
    table = _read_metadata(pinned)
    for name, index in indexes.items():
        if index.ntotal != table.num_rows or index.d != dim:
            raise ValueError(f"{layout.root}: {layout.faiss(name).name} does not match the metadata / {layout.info.name}")
    return SearchIndex(indexes, table, info, layout.root)


def sample_id(row: dict[str, Any]) -> tuple[str, str]:
    """Which sample a metadata row describes: its key within its shard, or (a folder's image) its
    file. A key alone repeats across collections: prep numbers each one's samples from 0, and a
    folder's keys are paths relative to that folder."""
    shard = row.get("shard") or ""
    return (str(shard), str(row.get("key"))) if shard else ("", str(row.get("source") or row.get("key")))


def add_to_index(folder: str | os.PathLike, vectors: dict[str, np.ndarray],
                 metadata: list[dict[str, Any]]) -> tuple[SearchIndex, int]:
    """Append vectors (one (M, D) array per target of the index) and their metadata rows,
    skipping rows of samples the index already holds (``sample_id``): adding the same rows
    twice (or again after a run killed past its commit) adds them once.

    The index keeps its trained quantizers and tuned parameter; its info records the
    count the recall was measured at (``count_at_tuning``) beside the new ``count``. The
    grown folder is written beside the old one and swapped into place whole.

    Returns:
        ``(the grown index, the number of rows skipped as already indexed)``.
    """
    import pyarrow as pa

    index = load_index(folder, mmap=False)
    if set(vectors) != set(index.indexes):
        raise ValueError(f"the index has targets {sorted(index.indexes)}, the new embeddings {sorted(vectors)}")
    m = len(metadata)
    for name, v in vectors.items():
        if v.shape != (m, index.dim):
            raise ValueError(f"new {name} vectors have shape {v.shape}, the index needs ({m}, {index.dim})")
    columns = [c for c in ("key", "shard", "source") if c in index.table.column_names]
    known = {sample_id(row) for row in index.table.select(columns).to_pylist()}
    keep = [i for i, row in enumerate(metadata) if sample_id(row) not in known]
    if not keep:
        return index, m
    with replaced_folder(folder, IndexFolder(folder).info.name, carry=True) as tmp:
        layout = IndexFolder(tmp)
        for name, v in vectors.items():
            index.indexes[name].add(np.ascontiguousarray(v[keep], dtype=np.float32))
            replace_file(layout.faiss(name), lambda t, ix=index.indexes[name]: faiss.write_index(ix, str(t)))
        new = pa.Table.from_pylist([metadata[i] for i in keep]).cast(index.table.schema)
        table = pa.concat_tables([index.table, new])
        _save_metadata(layout.metadata, table.to_pylist())
        layout.legacy_metadata.unlink(missing_ok=True)  # the Arrow table now holds every row
        _write_info(layout, {**index.info, "count": table.num_rows})
    return load_index(folder, mmap=False), m - len(keep)


__all__ = ["PART_ROWS", "SearchIndex", "TargetPlan", "add_to_index", "build_indexes", "build_planned", "build_target",
           "clear_padding", "fill_part", "load_index", "merge_part", "mergeable", "plan_target", "sample_id", "save_index", "trained_index",
           "write_index"]
