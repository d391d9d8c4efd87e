"""Embed a collection into chunked, resumable embedding files.

An embeddings folder (its file names: ``clipalign.formats.folders.EmbeddingsFolder``) holds
its info (model identity, where the model came from, dim, dtype, the units to embed), a copy
of the weights that made the vectors (queries need them) and, per unit: the (n, D) L2-normalised image vectors, the
caption vectors (when captions are embedded), n metadata rows (key, caption, source, shard,
offset, size) and a ``done`` record written last (the unit is complete: count, skipped).

A killed run resumes at the first unit without its ``done`` record. Captions are cut to
``caption_char_limit`` before they are tokenised or stored.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from clipalign.embedding import image_features, jpeg_draft, text_features
from clipalign.formats.atomic import replace_file, write_json
from clipalign.formats.folders import EmbeddingsFolder
from clipalign.formats.sample import caption_char_limit, cut_caption
from clipalign.formats.skips import SkipCounter
from clipalign.model import ClipAlign
from clipalign.model_source import ModelSource
from retrieval.embeddings import Embeddings
from retrieval.sources import Unit, folder_units, shard_units, unit_items

METADATA_COLUMNS = ("key", "caption", "source", "shard", "offset", "size")


def resolve_units(data: str | os.PathLike, per_chunk: int = 10_000) -> list[Unit]:
    """The shards at ``data`` (a folder of ``*.tar``, a glob or a brace pattern), else the images
    of the folder ``data`` in units of ``per_chunk``.

    Raises:
        FileNotFoundError: neither shards nor images are found there.
    """
    from clipalign.data import resolve_shards

    shards = resolve_shards(str(data))
    if shards:
        return shard_units(shards)
    if Path(data).is_dir():
        units = folder_units(data, per_chunk)
        if units:
            return units
    raise FileNotFoundError(f"no shards and no images found at {data}")


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
               batch_size: int, precision: str, exact_decode: bool = False,
               on_batch: Callable[[int], None] | None = None
               ) -> tuple[np.ndarray, np.ndarray | None, list[dict[str, Any]], dict[str, int]]:
    """Embed one unit. Returns ``(image (n, D), caption (n, D) or None, rows, skipped counts)``, float32.

    Each row's caption is cut to ``caption_char_limit`` (what is embedded is what is stored).
    A large JPEG is decoded at a reduced scale (``clipalign.embedding.jpeg_draft``) unless
    ``exact_decode``.
    """
    counter = SkipCounter()
    limit = caption_char_limit(int(getattr(tokenizer, "context_length", 77)))
    draft = None if exact_decode else jpeg_draft(transform)
    items = ((item.image, item.row | {"caption": cut_caption(item.row["caption"], limit)})
             for item in unit_items(unit, counter, draft))
    feats, rows = image_features(model, transform, items, batch_size=batch_size, precision=precision,
                                 on_batch=on_batch)
    image = feats.numpy()
    text = None
    if captions:
        text = (text_features(model, tokenizer, [r["caption"] for r in rows], precision=precision).numpy()
                if rows else np.zeros((0, image.shape[1]), np.float32))
    return image, text, rows, dict(counter.counts)


def start_folder(out: str | os.PathLike, info: dict[str, Any]) -> EmbeddingsFolder:
    """The embeddings folder ``out``, its info written if new, else checked against ``info``.

    Raises:
        ValueError: ``out`` holds embeddings of another model, dim, dtype, captions or units.
    """
    folder = EmbeddingsFolder(out)
    if folder.info.is_file():
        old = json.loads(folder.info.read_text())
        for field in ("model", "dim", "dtype", "captions", "units"):
            if old.get(field) != info[field]:
                raise ValueError(f"{out} holds embeddings with another {field}; use a new --out folder to start afresh")
    else:
        write_json(folder.info, info)
    return folder


def folder_info(units: list[Unit], *, identity: dict[str, str], dim: int, dtype: str, captions: bool,
                source: dict[str, Any] | None = None) -> dict[str, Any]:
    """What an embeddings folder's info holds (``source``: ``model_source_record``, if known)."""
    info = {"model": identity, "dim": dim, "dtype": dtype, "captions": captions,
            "units": [asdict(u) | {"files": list(u.files)} for u in units]}
    return info | ({"model_source": source} if source is not None else {})


def embed_and_write(model: ClipAlign, transform: Callable, tokenizer: Callable, unit: Unit, folder: EmbeddingsFolder,
                    *, captions: bool, dtype: str, batch_size: int, precision: str, exact_decode: bool = False,
                    on_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Embed ``unit`` (``embed_unit``) and write its files, the ``done`` record last; returns that record."""
    image, text, rows, skipped = embed_unit(model, transform, tokenizer, unit, captions=captions,
                                            batch_size=batch_size, precision=precision, exact_decode=exact_decode,
                                            on_batch=on_batch)
    _save_npy(folder.image_vectors(unit.name), image.astype(dtype))
    if text is not None:
        _save_npy(folder.text_vectors(unit.name), text.astype(dtype))
    _save_parquet(folder.metadata(unit.name), rows)
    done = {"count": len(rows), "skipped": skipped}
    write_json(folder.done(unit.name), done)
    return done


def embed_collection(model: ClipAlign, transform: Callable, tokenizer: Callable, units: list[Unit],
                     out: str | os.PathLike, *, identity: dict[str, str], source: dict[str, Any] | None = None,
                     captions: bool = True,
                     dtype: str = "float16", batch_size: int = 256, precision: str = "fp32",
                     exact_decode: bool = False, on_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Embed every unit not yet done into ``out``; returns the folder's totals (see ``summary``).

    Writes the vectors, metadata and ``done`` records; ``embed_folder`` adds the model copy.
    ``source`` (``model_source_record``) is recorded as the first run found it, never compared:
    the identity is what must match.

    Raises:
        ValueError: ``out`` holds embeddings of another model, source or format.
    """
    folder = start_folder(out, folder_info(units, identity=identity, dim=int(model.clip.visual.output_dim),
                                           dtype=dtype, captions=captions, source=source))
    for unit in units:
        if not folder.done(unit.name).is_file():
            embed_and_write(model, transform, tokenizer, unit, folder, captions=captions, dtype=dtype,
                            batch_size=batch_size, precision=precision, exact_decode=exact_decode, on_batch=on_batch)
    return summary(out)


def model_source_record(meta: dict[str, Any]) -> dict[str, Any]:
    """Where a model came from (``meta["source"]`` of ``load_model_source``), each file it was
    read from with its size and sha256 (``retrieval.identity.file_digest``)."""
    from retrieval.identity import file_digest

    source = dict(meta["source"])
    source["files"] = {path: file_digest(path) for path in source.get("files", [])}
    return source


ENGINES = ("local", "ray")


def embed_folder(source: ModelSource | str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *,
                 captions: bool = True, dtype: str = "float16", per_chunk: int = 10_000, batch_size: int = 256,
                 precision: str = "fp32", exact_decode: bool = False, progress: Callable[..., Any] | None = None,
                 engine: str = "local",
                 ray_address: str | None = None, num_gpus: float = 0, actors: int | None = None) -> dict[str, Any]:
    """Embed the images (and captions) at ``data`` with the model of ``source`` (a checkpoint or
    run folder, or pretrained weights) into the embeddings folder ``out``, resuming after its
    last finished unit, and copy the weights beside the vectors.

    Args:
        exact_decode: decode every JPEG whole, as the model's own preprocessing does; by default
            a large one is decoded at a reduced scale (``clipalign.embedding.jpeg_draft``).
        progress: a tqdm-like factory; one bar counts the images of all units.
        engine: ``"local"`` (this process) or ``"ray"``: the units go to a pool of Ray actors,
            one model each (``retrieval.ray_embed``), on the cluster at ``ray_address``, with
            ``num_gpus`` GPUs per actor and ``actors`` of them (default: as many as fit).

    Returns:
        The folder's totals (see ``summary``).

    Raises:
        FileNotFoundError: no checkpoint, or no shards and no images at ``data``.
        KeyError, ValueError: an unreadable checkpoint, or ``out`` holds other embeddings.
        RuntimeError, ConnectionError: with ``engine="ray"``, Ray is missing or no cluster answers.
    """
    from clipalign.checkpoint import save_checkpoint
    from clipalign.model_source import carried_state, load_model_source
    from retrieval.identity import model_identity

    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r} (choose from {', '.join(ENGINES)})")
    units = resolve_units(data, per_chunk)
    model, transform, tokenizer, meta = load_model_source(source)
    identity = model_identity(meta["model_name"], model.state_dict())  # the weights', not what the file claims
    record = model_source_record(meta)
    bar = progress(desc="embedding", unit="img") if progress else None
    try:
        if engine == "ray":
            from retrieval.ray_embed import embed_on_ray, pinned_source

            folder = start_folder(out, folder_info(units, identity=identity, dim=int(model.clip.visual.output_dim),
                                                   dtype=dtype, captions=captions, source=record))
            todo = [u for u in units if not folder.done(u.name).is_file()]
            embed_on_ray(pinned_source(ModelSource.of(source), meta["path"]), identity, todo, out, embed_and_write,
                         captions=captions, dtype=dtype, batch_size=batch_size, precision=precision,
                         exact_decode=exact_decode, address=ray_address, num_gpus=num_gpus, actors=actors,
                         on_unit=(lambda _, n: bar.update(n)) if bar is not None else None)
            totals = summary(out)
        else:
            totals = embed_collection(model, transform, tokenizer, units, out, identity=identity, source=record,
                                      captions=captions, dtype=dtype, batch_size=batch_size, precision=precision,
                                      exact_decode=exact_decode, on_batch=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    # The vectors travel with the weights that made them: queries must use the same model.
    save_checkpoint(EmbeddingsFolder(out).model, carried_state(model, meta, identity))
    return totals


def summary(folder: str | os.PathLike) -> dict[str, Any]:
    """``{"units", "done", "count", "skipped": {reason: n}}`` of an embeddings folder."""
    folder = EmbeddingsFolder(folder)
    info = json.loads(folder.info.read_text())
    done = [json.loads(folder.done(u["name"]).read_text()) for u in info["units"] if folder.done(u["name"]).is_file()]
    skipped: dict[str, int] = {}
    for d in done:
        for reason, n in d["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    return {"units": len(info["units"]), "done": len(done), "count": sum(d["count"] for d in done), "skipped": skipped}


def load_embeddings(folder: str | os.PathLike) -> tuple[dict[str, np.ndarray], list[dict[str, Any]], dict[str, Any]]:
    """Read a complete embeddings folder into memory (``Embeddings`` reads it a part at a time).

    Returns:
        ``({"image": (N, D), "caption": (N, D)?} float32, N metadata rows, the folder's info)``.

    Raises:
        FileNotFoundError: not an embeddings folder.
        ValueError: some unit is not embedded yet (resume ``clipalign embed`` first).
    """
    embeddings = Embeddings.open(folder)
    rows = [r for table in embeddings.metadata_tables() for r in table.to_pylist()]
    return {t: embeddings.vectors(t) for t in embeddings.targets}, rows, embeddings.info
