"""Readers that stream image-caption records from a manifest file or a caption folder.

Every reader checks what it can up front (the file opens, the header has the columns)
and raises ``ManifestError`` for that, then yields ``Record``s lazily, one row at a
time. Problems in a single row never raise: they travel in ``Record.error`` so the
caller can skip and count them.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

MANIFEST_EXTENSIONS: dict[str, str] = {".csv": ",", ".tsv": "\t", ".jsonl": ""}
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)


class ManifestError(ValueError):
    """The manifest as a whole cannot be read (unknown type, missing column, ...)."""


@dataclass(frozen=True)
class Record:
    """One input row.

    Attributes:
        index: 0-based position among the input's data rows (blank lines not counted).
        source: The image path as written in the input.
        path: ``source`` resolved against the manifest's folder (``None`` if no path).
        caption: The caption with surrounding whitespace stripped (``None`` if absent).
        error: A short reason if the row itself is malformed (e.g. ``"bad_row"``).
        detail: Human-readable detail for ``error``.
    """

    index: int
    source: str
    path: Path | None
    caption: str | None
    error: str | None = None
    detail: str | None = None

    @property
    def key(self) -> str:
        """The sample key: the row index, zero-padded to 9 digits."""
        return f"{self.index:09d}"


def _resolve(base: Path, source: str) -> Path | None:
    if not source:
        return None
    p = Path(source)
    return p if p.is_absolute() else base / p


def _strip(value: object) -> str | None:
    return None if value is None else str(value).strip()


def read_delimited(
    path: str | os.PathLike,
    *,
    image_col: str = "image",
    caption_col: str = "caption",
    delimiter: str = ",",
) -> Iterator[Record]:
    """Stream a CSV/TSV manifest with a header row.

    Raises:
        ManifestError: if the header is missing or lacks ``image_col``/``caption_col``.
    """
    path = Path(path)
    f = open(path, newline="", encoding="utf-8-sig")
    try:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            raise ManifestError(f"{path} is empty (no header row)")
        header = [h.strip() for h in header]
        for col, flag in ((image_col, "--image-col"), (caption_col, "--caption-col")):
            if col not in header:
                raise ManifestError(f"{path} has no column {col!r} (columns: {', '.join(header)}; see {flag})")
    except BaseException:
        f.close()
        raise
    return _delimited_rows(f, reader, path.parent, header.index(image_col), header.index(caption_col))


def _delimited_rows(f: IO[str], reader: Iterator[list[str]], base: Path, i_img: int, i_cap: int) -> Iterator[Record]:
    with f:
        index = 0
        for row in reader:
            if not row or all(not cell.strip() for cell in row):
                continue
            if max(i_img, i_cap) >= len(row):
                yield Record(index, "", None, None, "bad_row", f"row has {len(row)} fields")
            else:
                source = row[i_img].strip()
                yield Record(index, source, _resolve(base, source), _strip(row[i_cap]))
            index += 1


def read_jsonl(
    path: str | os.PathLike,
    *,
    image_col: str = "image",
    caption_col: str = "caption",
) -> Iterator[Record]:
    """Stream a JSON-lines manifest (one object per line).

    The first object must hold both keys; later malformed lines become ``bad_row`` records.

    Raises:
        ManifestError: if the first object is not valid JSON or lacks a key.
    """
    path = Path(path)
    f = open(path, encoding="utf-8-sig")
    try:
        first = next((line for line in f if line.strip()), None)
        if first is None:
            raise ManifestError(f"{path} is empty")
        try:
            obj = json.loads(first)
        except json.JSONDecodeError as err:
            raise ManifestError(f"{path}: first line is not JSON ({err})") from None
        if not isinstance(obj, dict):
            raise ManifestError(f"{path}: first line is not a JSON object")
        for col, flag in ((image_col, "--image-col"), (caption_col, "--caption-col")):
            if col not in obj:
                raise ManifestError(f"{path} has no field {col!r} (fields: {', '.join(obj)}; see {flag})")
    except BaseException:
        f.close()
        raise
    return _jsonl_rows(f, first, path.parent, image_col, caption_col)


def _jsonl_rows(f: IO[str], first: str, base: Path, image_col: str, caption_col: str) -> Iterator[Record]:
    def lines() -> Iterator[str]:
        yield first
        yield from f

    with f:
        index = 0
        for line in lines():
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                yield Record(index, "", None, None, "bad_row", f"invalid JSON: {err}")
            else:
                if not isinstance(obj, dict) or image_col not in obj:
                    yield Record(index, "", None, None, "bad_row", f"no field {image_col!r}")
                else:
                    source = str(obj[image_col]).strip()
                    yield Record(index, source, _resolve(base, source), _strip(obj.get(caption_col)))
            index += 1


def read_folder(root: str | os.PathLike) -> Iterator[Record]:
    """Stream the images under ``root`` (recursively, sorted) with same-stem ``.txt`` captions.

    A missing caption file gives ``caption=None``. ``source`` is relative to ``root``.
    """
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"{root} is not a folder")
    images = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )
    for index, rel in enumerate(images):
        path = root / rel
        txt = path.with_suffix(".txt")
        caption = txt.read_text(encoding="utf-8", errors="replace").strip() if txt.is_file() else None
        yield Record(index, rel, path, caption)


def open_records(
    source: str | os.PathLike,
    *,
    image_col: str = "image",
    caption_col: str = "caption",
) -> Iterator[Record]:
    """Pick the reader by what ``source`` is: a folder, or a ``.csv``/``.tsv``/``.jsonl`` file.

    Raises:
        FileNotFoundError: if ``source`` does not exist.
        ManifestError: for an unknown extension or a missing column.
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"input not found: {source}")
    if source.is_dir():
        return read_folder(source)
    ext = source.suffix.lower()
    if ext not in MANIFEST_EXTENSIONS:
        raise ManifestError(
            f"unknown manifest type {ext or '(none)'!r} for {source}; expected .csv, .tsv, .jsonl or a folder"
        )
    if ext == ".jsonl":
        return read_jsonl(source, image_col=image_col, caption_col=caption_col)
    return read_delimited(source, image_col=image_col, caption_col=caption_col, delimiter=MANIFEST_EXTENSIONS[ext])
