"""A complete embeddings folder (written by ``retrieval.embed``), read a part at a time.

Light on purpose (numpy and pyarrow, no torch): the Ray tasks that fill an index's parts
import it to read their own rows.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from clipalign.formats.folders import EmbeddingsFolder

TARGETS = {"image": "image_vectors", "caption": "text_vectors"}  # target → its EmbeddingsFolder path


@dataclass(frozen=True)
class Embeddings:
    """A complete embeddings folder, read a part at a time: rows ``[start, stop)`` of a target's
    vectors, some rows by id, or the metadata unit by unit. Small (paths and counts): it travels to
    the Ray tasks that each read their own part."""

    root: str
    info: dict[str, Any]
    names: tuple[str, ...]  # the units, in row order
    counts: tuple[int, ...]  # rows of each unit

    @classmethod
    def open(cls, folder: str | os.PathLike) -> Embeddings:
        """Raises:
            FileNotFoundError: not an embeddings folder.
            ValueError: some unit is not embedded yet (resume ``clipalign embed`` first), or a
                record that is not one.
        """
        layout = EmbeddingsFolder(folder)
        if not layout.info.is_file():
            raise FileNotFoundError(f"not an embeddings folder (no {layout.info})")
        info = json.loads(layout.info.read_text())
        names = tuple(u["name"] for u in info["units"])
        missing = [n for n in names if not layout.done(n).is_file()]
        if missing:
            raise ValueError(f"{folder}: {len(missing)} of {len(names)} units are not embedded yet; "
                             "re-run 'clipalign embed'")
        counts = []
        for n in names:
            count = json.loads(layout.done(n).read_text()).get("count")
            if not isinstance(count, int) or count < 0:
                raise ValueError(f"{layout.done(n)}: not a done record (count {count!r})")
            counts.append(count)
        return cls(str(layout.root.resolve()), info, names, tuple(counts))

    @property
    def count(self) -> int:
        return sum(self.counts)

    @property
    def dim(self) -> int:
        return int(self.info["dim"])

    @property
    def targets(self) -> list[str]:
        return ["image", "caption"] if self.info["captions"] else ["image"]

    def _unit(self, target: str, i: int) -> np.ndarray:
        """Unit ``i``'s (n, D) vectors of ``target``, memory-mapped, checked against its done record."""
        path = getattr(EmbeddingsFolder(self.root), TARGETS[target])(self.names[i])
        array = np.load(path, mmap_mode="r")  # never unpickles: allow_pickle stays False
        if array.shape != (self.counts[i], self.dim) or array.dtype not in (np.float16, np.float32):
            raise ValueError(f"{path} holds {array.dtype} {array.shape}, not the ({self.counts[i]}, {self.dim}) "
                             "vectors its done record and info describe")
        return array

    def vectors(self, target: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``[start, stop)`` of ``target``'s vectors: (stop - start, D) float32."""
        stop = self.count if stop is None else stop
        ends = np.cumsum((0, *self.counts))
        parts = [self._unit(target, i)[max(start - ends[i], 0) : min(stop, ends[i + 1]) - ends[i]].astype(np.float32)
                 for i in range(len(self.names)) if ends[i] < stop and ends[i + 1] > start]
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)

    def take(self, target: str, ids: np.ndarray) -> np.ndarray:
        """The rows ``ids`` (any order) of ``target``'s vectors: (len(ids), D) float32."""
        ids = np.asarray(ids, np.int64)
        order = np.argsort(ids, kind="stable")
        unit_of = np.searchsorted(np.cumsum(self.counts), ids[order], side="right")
        ends = np.cumsum((0, *self.counts))
        out = np.empty((len(ids), self.dim), np.float32)
        for i in np.unique(unit_of):
            here = order[unit_of == i]
            out[here] = self._unit(target, int(i))[ids[here] - ends[i]]
        return out

    def metadata_tables(self) -> Iterator[Any]:
        """Each unit's metadata as a ``pyarrow.Table``, in row order."""
        import pyarrow.parquet as pq

        layout = EmbeddingsFolder(self.root)
        for name, count in zip(self.names, self.counts):
            table = pq.read_table(layout.metadata(name))
            if table.num_rows != count:
                raise ValueError(f"{layout.metadata(name)} holds {table.num_rows} rows, its done record {count}")
            yield table.replace_schema_metadata(None)
