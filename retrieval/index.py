"""FAISS indexes saved with their metadata, tuning results and the identity of the model that made them.

An index folder (its file names: ``clipalign.formats.folders.IndexFolder``) holds one FAISS
index per embedded target (``image``, and ``caption`` when captions were embedded), the
metadata table (Arrow IPC, memory-mapped on load; row i describes vector i of each), the
info (dim, count, model identity, per-target index type, search parameter, measured recall,
latency and memory), the weights queries are embedded with and, optionally, the text tower
as ONNX (see ``retrieval.query_encoder``). ``retrieval.build`` writes whole folders.
Vectors are L2-normalised, so inner product is cosine similarity.

Each index is built in parts (``retrieval.faiss_parts``); here the parts are filled in turn,
``retrieval.ray_index`` fills the same parts as Ray tasks.

Nothing in a folder is trusted on load: the info records each file's size and sha256
(``retrieval.identity.file_digest``) and names no file but the folder's own; a folder is
written whole in a temporary sibling and swapped into place (``retrieval.atomic_folder``).
"""
from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import faiss
import numpy as np

from clipalign.formats.atomic import replace_file, write_json
from clipalign.formats.folders import IndexFolder
from retrieval.atomic_folder import pinned_folder, recover, replaced_folder, swapped
from retrieval.faiss_parts import PART_ROWS, build_target
from retrieval.identity import check_digest, check_model, file_digest
from retrieval.tune import set_params

MMAP_ABOVE = 256 << 20  # index files larger than this are memory-mapped on load
FILES = "files"  # the info's record of each file it describes: {file name: file_digest}


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
    files = [folder.faiss(t) for t in info["targets"]] + [folder.metadata, folder.model, folder.text_query,
                                                          folder.image_query]
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
             "text_query.file": ((info.get("text_query") or {}).get("file"), layout.text_query.name),
             "image_query.file": ((info.get("image_query") or {}).get("file"), layout.image_query.name)}
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


__all__ = ["SearchIndex", "add_to_index", "build_indexes", "load_index", "sample_id", "save_index", "write_index"]
