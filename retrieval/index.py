"""FAISS indexes saved with their metadata and the identity of the model that made them.

Layout of an index folder: ``image.faiss`` (image embeddings), ``caption.faiss`` (caption
embeddings), ``metadata.jsonl`` (row i describes vector i of both) and ``info.json``.
Vectors are L2-normalised, so inner product is cosine similarity.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

TARGETS = ("image", "caption")


def flat_index(vectors: np.ndarray) -> faiss.Index:
    """Exact inner-product index over (N, D) float32 vectors."""
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


@dataclass
class SearchIndex:
    """Indexes over the same collection, its metadata rows and ``info.json``."""

    indexes: dict[str, faiss.Index]  # "image" / "caption" → index
    metadata: list[dict[str, Any]]
    info: dict[str, Any]

    @property
    def dim(self) -> int:
        return int(self.info["dim"])

    def search(self, queries: np.ndarray, k: int, target: str = "image") -> list[list[dict[str, Any]]]:
        """Top-``k`` hits per query row, best first: ``{"score", "rank", **metadata}``.

        Args:
            queries: (Q, D) normalised query features from the same model.
            target: ``"image"`` or ``"caption"``.
        """
        if target not in self.indexes:
            raise KeyError(f"this index has no {target!r} vectors (has: {', '.join(self.indexes)})")
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"query dimension {queries.shape[-1]} does not match the index's {self.dim}")
        scores, ids = self.indexes[target].search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return [
            [{"rank": r + 1, "score": float(s), **self.metadata[i]} for r, (s, i) in enumerate(zip(row_s, row_i)) if i >= 0]
            for row_s, row_i in zip(scores, ids)
        ]


def save_index(out: str | os.PathLike, vectors: dict[str, np.ndarray], metadata: list[dict[str, Any]],
               info: dict[str, Any]) -> SearchIndex:
    """Build exact indexes over each target's (N, D) vectors and write the folder."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n, dim = next(iter(vectors.values())).shape
    if any(v.shape != (n, dim) for v in vectors.values()) or len(metadata) != n:
        raise ValueError("every target needs one (N, D) vector per metadata row")
    indexes = {name: flat_index(v) for name, v in vectors.items()}
    for name, index in indexes.items():
        faiss.write_index(index, str(out / f"{name}.faiss"))
    with (out / "metadata.jsonl").open("w") as f:
        for row in metadata:
            f.write(json.dumps(row) + "\n")
    info = {**info, "dim": dim, "count": n, "metric": "inner_product", "index_type": "Flat", "targets": list(indexes)}
    (out / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    return SearchIndex(indexes, metadata, info)


def load_index(folder: str | os.PathLike) -> SearchIndex:
    """Read an index folder; raises ``FileNotFoundError`` naming what is missing."""
    folder = Path(folder)
    info_file = folder / "info.json"
    if not info_file.is_file():
        raise FileNotFoundError(f"not an index folder (no {info_file})")
    info = json.loads(info_file.read_text())
    indexes = {t: faiss.read_index(str(folder / f"{t}.faiss")) for t in info["targets"]}
    with (folder / "metadata.jsonl").open() as f:
        metadata = [json.loads(line) for line in f]
    for name, index in indexes.items():
        if index.ntotal != len(metadata) or index.d != info["dim"]:
            raise ValueError(f"{folder}: {name}.faiss does not match metadata.jsonl / info.json")
    return SearchIndex(indexes, metadata, info)
