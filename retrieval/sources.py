"""Where images come from: WebDataset shards (read with member offsets) or a plain image folder.

Each source is cut into *units* (one shard, or one slice of a folder's files). A unit is the
step of resumable embedding: it is embedded and written whole, or not at all.
"""
from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from clipalign.formats.images import Draft, decode_image, image_files, is_regular_file, open_regular_file, read_image
from clipalign.formats.sample import JSON, KEY, image_key, sample_text
from clipalign.formats.skips import SkipCounter

CAPTION_READ_LIMIT = 1 << 20  # bytes of a caption file beside an image that are read


@dataclass(frozen=True)
class Unit:
    """One resumable piece of work: a shard path, or a slice of folder files."""

    name: str  # stable id, e.g. "00003"
    shard: str = ""  # shard path; "" for folder units
    files: tuple[str, ...] = ()  # folder files, relative to ``root``
    root: str = ""


@dataclass
class Item:
    """A readable image and the metadata row that describes it."""

    image: Image.Image
    row: dict[str, Any]  # key, caption, source, shard, offset, size


def folder_units(root: str | os.PathLike, per_unit: int = 10_000) -> list[Unit]:
    """Units of at most ``per_unit`` images of ``root`` (recursive, sorted)."""
    root = Path(root).resolve()
    files = [p.relative_to(root).as_posix() for p in image_files(root)]
    return [Unit(f"{i // per_unit:05d}", files=tuple(files[i : i + per_unit]), root=str(root))
            for i in range(0, len(files), per_unit)]


def shard_units(shards: list[str]) -> list[Unit]:
    return [Unit(f"{i:05d}", shard=str(Path(s).resolve())) for i, s in enumerate(shards)]


def _key_ext(name: str) -> tuple[str, str]:
    # WebDataset convention: the key is everything up to the first dot of the base name.
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def tar_samples(shard: str, counter: SkipCounter) -> Iterator[dict[str, Any]]:
    """Samples of a tar shard as ``{"__key__", ext: bytes, "__where__": {ext: (offset, size)}}``.

    A truncated or unreadable shard yields what precedes the damage and counts one skip.
    """
    current: dict[str, Any] = {}
    try:
        with tarfile.open(shard, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _key_ext(member.name)
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise tarfile.ReadError(f"{shard}: {member.name} is truncated")
                if current and current[KEY] != key:
                    yield current
                    current = {}
                current.setdefault(KEY, key)
                current.setdefault("__where__", {})[ext] = (member.offset_data, member.size)
                current[ext] = data
    except (tarfile.TarError, EOFError, OSError) as exn:
        counter(exn)
        return  # the partial last sample may be torn: drop it
    if current:
        yield current


def shard_items(unit: Unit, counter: SkipCounter, draft: Draft | None = None) -> Iterator[Item]:
    for sample in tar_samples(unit.shard, counter):
        try:
            ext = image_key(sample)
            image = decode_image(sample[ext], sample[KEY], draft=draft)
            info = json.loads(sample[JSON]) if JSON in sample else {}
        except Exception as exn:
            counter(exn)
            continue
        offset, size = sample["__where__"][ext]
        yield Item(image, {"key": sample[KEY], "caption": sample_text(sample),
                           "source": str(info.get("source", "")), "shard": unit.shard, "offset": offset, "size": size})


def folder_items(unit: Unit, counter: SkipCounter, draft: Draft | None = None) -> Iterator[Item]:
    root = Path(unit.root)
    for rel in unit.files:
        path = root / rel
        try:
            image = read_image(path, draft=draft)
        except Exception as exn:
            counter(exn)
            continue
        side = path.with_suffix(".txt")
        caption = ""
        if is_regular_file(side):
            try:
                with open_regular_file(side) as f:  # a caption past this is cut anyway (retrieval.embed)
                    caption = f.read(CAPTION_READ_LIMIT).decode("utf-8", errors="replace").strip()
            except (OSError, ValueError):  # gone or swapped since the check: no caption
                caption = ""
        yield Item(image, {"key": str(Path(rel).with_suffix("")), "caption": caption, "source": str(path),
                           "shard": "", "offset": -1, "size": path.stat().st_size})


def unit_items(unit: Unit, counter: SkipCounter, draft: Draft | None = None) -> Iterator[Item]:
    """The readable images of a unit, in order; unreadable ones are counted in ``counter``.
    ``draft``: how small a JPEG may be decoded (``clipalign.embedding.jpeg_draft``)."""
    return shard_items(unit, counter, draft) if unit.shard else folder_items(unit, counter, draft)


def read_image_bytes(row: dict[str, Any], max_bytes: int = 32 << 20) -> bytes:
    """The stored bytes of an indexed image, found from its metadata row only.

    Raises:
        ValueError: the row says the image is over ``max_bytes``; ``BadSample`` (a ValueError)
            when its shard or file is missing or not a regular file (a FIFO would block forever).
        OSError: the file cannot be read.
    """
    size = int(row["size"])
    if size > max_bytes:
        raise ValueError("image too large")
    if row.get("shard"):
        with open_regular_file(row["shard"]) as f:
            f.seek(int(row["offset"]))
            return f.read(size)
    with open_regular_file(row["source"]) as f:
        data = f.read(max_bytes + 1)  # the file may have grown since it was indexed
    if len(data) > max_bytes:
        raise ValueError("image too large")
    return data
