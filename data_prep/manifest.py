"""Readers that stream image-caption records from a manifest file or a caption folder.

Every reader checks what it can up front (the file opens, the header has the columns)
and raises ``ManifestError`` for that, then yields ``Record``s lazily, one row at a
time, so memory stays flat however long the manifest is. Problems in a single row
never raise: they travel in ``Record.error`` so the caller can skip and count them.

Formats: ``.csv``, ``.tsv``, ``.jsonl``, ``.parquet`` (each optionally ``.gz``), a
COCO captions ``.json`` (see ``data_prep.coco``) and a folder of images with
same-stem ``.txt`` captions. The image column may hold a local path (relative to the
manifest's folder), a ``file://`` URL or an ``http(s)://`` URL.

``Manifest`` names an input and its reading options, so that another process (a Ray task)
can open it again; ``read_range`` reads one ``RowRange`` of an uncompressed CSV/TSV/JSONL or
Parquet manifest from where it starts (``data_prep.splits`` finds where each range starts),
giving exactly the records ``open_records`` gives for those rows.
"""
from __future__ import annotations

import csv
import gzip
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator, Sequence

from clipalign.formats.images import image_files
from clipalign.formats.skips import BAD_ROW
from data_prep.coco import read_coco
from data_prep.records import ManifestError, Record, make_record

MANIFEST_EXTENSIONS: dict[str, str] = {".csv": ",", ".tsv": "\t", ".jsonl": "", ".parquet": "", ".json": ""}
PARQUET_BATCH_ROWS = 8192

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long captions must not abort the whole manifest


_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of a byte that is not UTF-8


def _strip(value: object) -> str | None:
    return None if value is None else str(value).strip()


def _open_text(path: Path) -> IO[str]:
    # surrogateescape: a byte that is not UTF-8 reaches the row that holds it (which becomes a
    # bad_row) instead of aborting the whole manifest with a UnicodeDecodeError
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", newline="", encoding="utf-8-sig", errors="surrogateescape")
    return open(path, newline="", encoding="utf-8-sig", errors="surrogateescape")


def _not_utf8(cells: Sequence[str], line: int) -> str | None:
    """The bad-row detail of a row with a byte that is not UTF-8, else ``None``."""
    for cell in cells:
        if not cell.isascii() and (found := _NOT_UTF8.search(cell)):
            return f"line {line}: byte 0x{ord(found.group()) - 0xDC00:02x} is not UTF-8"
    return None


def _guarded(rows: Iterator[Record], path: Path) -> Iterator[Record]:
    """``rows``, ending in one ``bad_row`` if the file breaks off (a truncated .gz, a read error):
    the rows before it are kept and the run goes on to write its stats."""
    index = 0
    try:
        for record in rows:
            index = record.index + 1
            yield record
    except (OSError, EOFError, csv.Error) as err:
        yield Record(index, "", None, None, BAD_ROW, f"{path}: unreadable after row {index}: {err}")


def _extra_names(columns: Sequence[str], used: Sequence[str], extra_cols: Sequence[str] | None, path: Path) -> list[str]:
    """The carried columns: ``None`` means every other column."""
    if extra_cols is None:
        return [c for c in columns if c not in used]
    missing = [c for c in extra_cols if c not in columns]
    if missing:
        raise ManifestError(f"{path} has no column(s) {', '.join(map(repr, missing))} (see --extra-cols)")
    return list(extra_cols)


def _check_columns(path: Path, columns: Sequence[str], image_col: str, caption_col: str, word: str = "column") -> None:
    for col, flag in ((image_col, "--image-col"), (caption_col, "--caption-col")):
        if col not in columns:
            raise ManifestError(f"{path} has no {word} {col!r} ({word}s: {', '.join(columns)}; see {flag})")


def read_delimited(
    path: str | os.PathLike,
    *,
    image_col: str = "image",
    caption_col: str = "caption",
    delimiter: str = ",",
    extra_cols: Sequence[str] | None = (),
) -> Iterator[Record]:
    """Stream a CSV/TSV manifest (optionally ``.gz``) with a header row.

    Raises:
        ManifestError: if the header is missing or lacks a named column.
    """
    path = Path(path)
    f = _open_text(path)
    try:
        reader = csv.reader(f, delimiter=delimiter)
        columns = _delimited_columns(path, next(reader, None), image_col, caption_col, extra_cols)
    except BaseException:
        f.close()
        raise
    return _guarded(_delimited_rows(f, reader, path.parent, columns), path)


@dataclass(frozen=True)
class _Columns:
    """Where a CSV/TSV row's fields are: the image, the caption and the carried columns."""

    image: int
    caption: int
    extras: list[tuple[str, int]]


def _delimited_columns(
    path: Path, header: list[str] | None, image_col: str, caption_col: str, extra_cols: Sequence[str] | None
) -> _Columns:
    if header is None:
        raise ManifestError(f"{path} is empty (no header row)")
    header = [h.strip() for h in header]
    _check_columns(path, header, image_col, caption_col)
    extras = [(name, header.index(name)) for name in _extra_names(header, (image_col, caption_col), extra_cols, path)]
    return _Columns(header.index(image_col), header.index(caption_col), extras)


def _delimited_rows(
    f: IO[str], reader: Any, base: Path, columns: _Columns, index: int = 0, lines_before: int = 0
) -> Iterator[Record]:
    """The records of ``reader`` from row ``index`` on; ``lines_before``: the file's lines before ``f``'s start."""
    i_img, i_cap, extras = columns.image, columns.caption, columns.extras
    with f:
        for row in reader:
            if not row or all(not cell.strip() for cell in row):
                continue
            if (bad := _not_utf8(row, lines_before + reader.line_num)) is not None:
                yield Record(index, "", None, None, BAD_ROW, bad)
            elif max(i_img, i_cap) >= len(row):
                yield Record(index, "", None, None, BAD_ROW, f"row has {len(row)} fields")
            else:
                extra = {name: row[i] for name, i in extras if i < len(row)}
                yield make_record(index, base, row[i_img].strip(), _strip(row[i_cap]), extra)
            index += 1


def read_jsonl(
    path: str | os.PathLike,
    *,
    image_col: str = "image",
    caption_col: str = "caption",
    extra_cols: Sequence[str] | None = (),
) -> Iterator[Record]:
    """Stream a JSON-lines manifest (one object per line, optionally ``.gz``).

    The first object must hold both keys; later malformed lines become ``bad_row`` records.
    With ``extra_cols=None`` every other key of each object is carried.

    Raises:
        ManifestError: if the first object is not valid JSON or lacks a key.
    """
    path = Path(path)
    f = _open_text(path)
    try:
        first_line, first = 0, None
        for first_line, line in enumerate(f, 1):
            if line.strip():
                first = line
                break
        if first is None:
            raise ManifestError(f"{path} is empty")
        try:
            obj = json.loads(first)
        except json.JSONDecodeError as err:
            raise ManifestError(f"{path}: first line is not JSON ({err})") from None
        if not isinstance(obj, dict):
            raise ManifestError(f"{path}: first line is not a JSON object")
        _check_columns(path, list(obj), image_col, caption_col, "field")
        if extra_cols is not None:
            _extra_names(list(obj), (image_col, caption_col), extra_cols, path)
    except BaseException:
        f.close()
        raise
    lines = itertools.chain([(first_line, first)], enumerate(f, first_line + 1))
    return _guarded(_jsonl_rows(f, lines, path.parent, image_col, caption_col, extra_cols), path)


def _jsonl_rows(
    f: IO[str], lines: Iterator[tuple[int, str]], base: Path, image_col: str, caption_col: str,
    extra_cols: Sequence[str] | None, index: int = 0,
) -> Iterator[Record]:
    """The records of ``lines`` (``(line number, line)`` read from ``f``), from row ``index`` on."""
    with f:
        for number, line in lines:
            if not line.strip():
                continue
            if (bad := _not_utf8([line], number)) is not None:
                yield Record(index, "", None, None, BAD_ROW, bad)
                index += 1
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                yield Record(index, "", None, None, BAD_ROW, f"invalid JSON: {err}")
            else:
                if not isinstance(obj, dict) or image_col not in obj:
                    yield Record(index, "", None, None, BAD_ROW, f"no field {image_col!r}")
                else:
                    names = [k for k in obj if k not in (image_col, caption_col)] if extra_cols is None else extra_cols
                    extra = {k: obj[k] for k in names if k in obj}
                    yield make_record(index, base, str(obj[image_col]).strip(), _strip(obj.get(caption_col)), extra)
            index += 1


def read_parquet(
    path: str | os.PathLike,
    *,
    image_col: str = "image",
    caption_col: str = "caption",
    extra_cols: Sequence[str] | None = (),
) -> Iterator[Record]:
    """Stream a Parquet manifest (optionally ``.gz``) in record batches (only the needed columns are read).

    Raises:
        ManifestError: if the file is not (gzipped) Parquet or lacks a named column.
    """
    path = Path(path)
    tmp: IO[bytes] | None = tempfile.TemporaryFile() if path.suffix.lower() == ".gz" else None
    try:
        pf = _parquet_file(path, tmp)
        columns = pf.schema_arrow.names
        _check_columns(path, columns, image_col, caption_col)
        extras = _extra_names(columns, (image_col, caption_col), extra_cols, path)
    except BaseException:
        if tmp is not None:
            tmp.close()
        raise
    batches = pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[image_col, caption_col, *extras])
    return _parquet_rows(batches, tmp, path.parent, image_col, caption_col, extras)


def _parquet_file(path: Path, tmp: IO[bytes] | None) -> Any:
    """``path`` as a ``pq.ParquetFile``; with ``tmp``, ``path`` is gzipped and is decompressed into ``tmp`` first.

    Parquet needs random access (its index is at the end), which a gzip stream does not
    give; the copy is streamed, so memory stays flat, and ``tmp`` is an anonymous file.
    """
    import pyarrow.parquet as pq

    try:
        if tmp is None:
            return pq.ParquetFile(path)
        with gzip.open(path, "rb") as f:
            shutil.copyfileobj(f, tmp, 1 << 20)
        tmp.seek(0)
        return pq.ParquetFile(tmp)
    except Exception as err:  # gzip raises BadGzipFile, EOFError; pyarrow ArrowInvalid, OSError, ...
        raise ManifestError(f"{path} is not a readable Parquet file ({err})") from None


def _json_safe(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool, list, dict)):
        return value
    return str(value)  # timestamps, decimals, bytes: keep a readable form in the sample's json


def _parquet_rows(
    batches: Iterator[Any], tmp: IO[bytes] | None, base: Path, image_col: str, caption_col: str, extras: list[str],
    index: int = 0,
) -> Iterator[Record]:
    """The rows of the record ``batches``, from row ``index`` on; ``tmp`` (the decompressed copy
    of a ``.gz`` input, if any) is closed at the end."""
    try:
        for batch in batches:
            data = batch.to_pydict()
            for i in range(batch.num_rows):
                source = data[image_col][i]
                extra = {name: _json_safe(data[name][i]) for name in extras}
                if source is None:
                    yield Record(index, "", None, None, BAD_ROW, f"no value in column {image_col!r}", extra=extra or None)
                else:
                    yield make_record(index, base, str(source).strip(), _strip(data[caption_col][i]), extra)
                index += 1
    finally:
        if tmp is not None:
            tmp.close()


def read_folder(root: str | os.PathLike) -> Iterator[Record]:
    """Stream the images under ``root`` (recursively, sorted) with same-stem ``.txt`` captions.

    A missing caption file gives ``caption=None``. ``source`` is relative to ``root``.
    """
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"{root} is not a folder")
    # a folder, FIFO or device named like an image is listed, to be counted as not_a_file
    images = [p.relative_to(root).as_posix() for p in image_files(root, regular_only=False)]
    for index, rel in enumerate(images):
        path = root / rel
        txt = path.with_suffix(".txt")
        caption = txt.read_text(encoding="utf-8", errors="replace").strip() if txt.is_file() else None
        yield Record(index, rel, path, caption)


def manifest_extension(path: Path) -> str:
    """The manifest type of ``path``: its suffix, looking through a trailing ``.gz``."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes[-1:] == [".gz"]:
        return suffixes[-2] if len(suffixes) > 1 else ""
    return suffixes[-1] if suffixes else ""


def open_records(
    source: str | os.PathLike,
    *,
    image_col: str = "image",
    caption_col: str = "caption",
    extra_cols: Sequence[str] | None = (),
    caption_mode: str = "all",
    image_root: str | os.PathLike | None = None,
) -> Iterator[Record]:
    """Pick the reader by what ``source`` is: a folder or a manifest file.

    Args:
        source: Folder, ``.csv``/``.tsv``/``.jsonl``/``.parquet`` (optionally ``.gz``) or COCO ``.json``.
        image_col: Column holding image paths or URLs.
        caption_col: Column holding captions.
        extra_cols: Other columns to carry into each sample's json; ``None`` carries them all.
        caption_mode: COCO only: ``all``, ``first`` or ``each`` (see ``data_prep.coco``).
        image_root: COCO only: the image folder (default: the json's folder).

    Raises:
        FileNotFoundError: if ``source`` does not exist.
        ManifestError: for an unknown extension or a missing column.
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"input not found: {source}")
    if source.is_dir():
        return read_folder(source)
    ext = manifest_extension(source)
    if ext not in MANIFEST_EXTENSIONS or (ext == ".json" and source.suffix.lower() == ".gz"):
        raise ManifestError(
            f"unknown manifest type {ext or '(none)'!r} for {source}; expected .csv, .tsv, .jsonl, .parquet "
            "(or .gz of those), a COCO captions .json or a folder"
        )
    if ext == ".json":
        return read_coco(source, image_root=image_root, caption_mode=caption_mode)
    if ext == ".parquet":
        return read_parquet(source, image_col=image_col, caption_col=caption_col, extra_cols=extra_cols)
    if ext == ".jsonl":
        return read_jsonl(source, image_col=image_col, caption_col=caption_col, extra_cols=extra_cols)
    return read_delimited(
        source, image_col=image_col, caption_col=caption_col, delimiter=MANIFEST_EXTENSIONS[ext], extra_cols=extra_cols
    )


@dataclass(frozen=True)
class Manifest:
    """An input and the options to read it with: what ``open_records`` takes, kept so that
    another process can open it again (picklable)."""

    source: Path
    image_col: str = "image"
    caption_col: str = "caption"
    extra_cols: tuple[str, ...] | None = ()
    caption_mode: str = "all"
    image_root: Path | None = None

    def records(self) -> Iterator[Record]:
        """Every record, as ``open_records`` streams them (see its errors)."""
        return open_records(self.source, image_col=self.image_col, caption_col=self.caption_col,
                            extra_cols=self.extra_cols, caption_mode=self.caption_mode, image_root=self.image_root)

    def check(self) -> None:
        """Raise what ``records`` raises for the input as a whole (a missing column, ...), then close it."""
        records = self.records()
        try:
            next(records, None)  # a reader checks what it can on opening, JSONL also its first row
        finally:
            records.close()

    @property
    def kind(self) -> str:
        """``.csv``, ``.tsv``, ``.jsonl``, ``.parquet``, ``.json`` (COCO) or ``""`` (a folder)."""
        return "" if self.source.is_dir() else manifest_extension(self.source)
