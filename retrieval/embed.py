"""Embed a collection into chunked, resumable embedding files.

Layout of an embeddings folder::

    embeddings.json          model identity, dim, dtype, the units to embed
    model.pt                 the weights that made the vectors (queries need them)
    img_emb/00000.npy        (n, D) image vectors of unit 00000, L2-normalised
    text_emb/00000.npy       (n, D) caption vectors (when captions are embedded)
    metadata/00000.parquet   n rows: key, caption, source, shard, offset, size
    done/00000.json          written last: the unit is complete (count, skipped)

A killed run resumes at the first unit without its ``done`` file.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from clipalign.atomic import replace_file, write_json
from clipalign.data import SkipCounter
from clipalign.embedding import text_features
from clipalign.model import ClipAlign
from clipalign.precision import autocast
from retrieval.sources import Item, Unit, unit_items

INFO = "embeddings.json"
METADATA_COLUMNS = ("key", "caption", "source", "shard", "offset", "size")


def _batches(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    batch: list[Item] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:  # a file object: np.save would append ".npy" to a path
            np.save(f, array)

    replace_file(path, write)


def _save_parquet(path: Path, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({c: [r[c] for r in rows] for c in METADATA_COLUMNS}) if rows else pa.table(
        {c: pa.array([], pa.int64() if c in ("offset", "size") else pa.string()) for c in METADATA_COLUMNS})
    replace_file(path, lambda tmp: pq.write_table(table, str(tmp)))


@torch.no_grad()
def embed_unit(model: ClipAlign, transform: Callable, tokenizer: Callable, unit: Unit, *, captions: bool,
               batch_size: int, precision: str, on_batch: Callable[[int], None] | None = None
               ) -> tuple[np.ndarray, np.ndarray | None, list[dict[str, Any]], dict[str, int]]:
    """Embed one unit. Returns ``(image (n, D), caption (n, D) or None, rows, skipped counts)``, float32."""
    counter = SkipCounter()
    feats, rows = [], []
    for batch in _batches(unit_items(unit, counter), batch_size):
        with autocast(precision):
            f = model.encode_image(torch.stack([transform(it.image) for it in batch]), normalize=True)
        feats.append(f.float().numpy())
        rows += [it.row for it in batch]
        if on_batch:
            on_batch(len(batch))
    dim = model.clip.visual.output_dim
    image = np.concatenate(feats) if feats else np.zeros((0, dim), np.float32)
    text = None
    if captions:
        text = (text_features(model, tokenizer, [r["caption"] for r in rows], precision=precision).numpy()
                if rows else np.zeros((0, dim), np.float32))
    return image, text, rows, dict(counter.counts)


def embed_collection(model: ClipAlign, transform: Callable, tokenizer: Callable, units: list[Unit],
                     out: str | os.PathLike, *, identity: dict[str, str], captions: bool = True,
                     dtype: str = "float16", batch_size: int = 256, precision: str = "fp32",
                     on_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Embed every unit not yet done into ``out``; returns the folder's totals (see ``summary``).

    Raises:
        ValueError: ``out`` holds embeddings of another model, source or format.
    """
    out = Path(out)
    dim = int(model.clip.visual.output_dim)
    info = {"model": identity, "dim": dim, "dtype": dtype, "captions": captions,
            "units": [asdict(u) | {"files": list(u.files)} for u in units]}
    if (out / INFO).is_file():
        old = json.loads((out / INFO).read_text())
        for field in ("model", "dim", "dtype", "captions", "units"):
            if old.get(field) != info[field]:
                raise ValueError(f"{out} holds embeddings with another {field}; use a new --out folder to start afresh")
    else:
        write_json(out / INFO, info)
    for unit in units:
        if (out / "done" / f"{unit.name}.json").is_file():
            continue
        image, text, rows, skipped = embed_unit(model, transform, tokenizer, unit, captions=captions,
                                                batch_size=batch_size, precision=precision, on_batch=on_batch)
        _save_npy(out / "img_emb" / f"{unit.name}.npy", image.astype(dtype))
        if text is not None:
            _save_npy(out / "text_emb" / f"{unit.name}.npy", text.astype(dtype))
        _save_parquet(out / "metadata" / f"{unit.name}.parquet", rows)
        write_json(out / "done" / f"{unit.name}.json", {"count": len(rows), "skipped": skipped})
    return summary(out)


def summary(folder: str | os.PathLike) -> dict[str, Any]:
    """``{"units", "done", "count", "skipped": {reason: n}}`` of an embeddings folder."""
    folder = Path(folder)
    info = json.loads((folder / INFO).read_text())
    done = [json.loads((folder / "done" / f"{u['name']}.json").read_text())
            for u in info["units"] if (folder / "done" / f"{u['name']}.json").is_file()]
    skipped: dict[str, int] = {}
    for d in done:
        for reason, n in d["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    return {"units": len(info["units"]), "done": len(done), "count": sum(d["count"] for d in done), "skipped": skipped}


def load_embeddings(folder: str | os.PathLike) -> tuple[dict[str, np.ndarray], list[dict[str, Any]], dict[str, Any]]:
    """Read a complete embeddings folder.

    Returns:
        ``({"image": (N, D), "caption": (N, D)?} float32, N metadata rows, embeddings.json)``.

    Raises:
        ValueError: some unit is not embedded yet (resume ``clipalign embed`` first).
    """
    import pyarrow.parquet as pq

    folder = Path(folder)
    if not (folder / INFO).is_file():
        raise FileNotFoundError(f"not an embeddings folder (no {folder / INFO})")
    info = json.loads((folder / INFO).read_text())
    names = [u["name"] for u in info["units"]]
    missing = [n for n in names if not (folder / "done" / f"{n}.json").is_file()]
    if missing:
        raise ValueError(f"{folder}: {len(missing)} of {len(names)} units are not embedded yet; re-run 'clipalign embed'")
    subdirs = {"image": "img_emb"} | ({"caption": "text_emb"} if info["captions"] else {})
    vectors = {t: np.concatenate([np.load(folder / d / f"{n}.npy") for n in names]).astype(np.float32)
               if names else np.zeros((0, info["dim"]), np.float32) for t, d in subdirs.items()}
    rows = [r for n in names for r in pq.read_table(folder / "metadata" / f"{n}.parquet").to_pylist()]
    return vectors, rows, info
