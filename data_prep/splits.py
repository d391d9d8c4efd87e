"""Where each shard's rows start in a manifest file, found without reading the rows.

A Ray run's driver hands every task a ``RowRange`` (see ``data_prep.manifest``) and the task
reads its own rows with ``read_range``, so the driver never parses the manifest:

* Parquet: the row groups' row counts in the file's footer give each range's first row group
  and the rows to skip in it.
* CSV/TSV/JSONL: one pass over the bytes finds the line where every ``shard_size``-th row
  starts. Rows are lines that are not blank (JSONL) or records that are not all blank cells
  (CSV); a CSV record runs on past a line end inside a quoted field, which a regular
  expression of the ``csv`` module's rules (default dialect) tells from the line's bytes.
  Only lines that could be blank are decoded.

``shard_ranges`` gives ``None`` where the driver must read the rows itself: folders, COCO
files, ``.gz`` manifests (a gzip stream has no offsets to seek to), and text holding a
carriage return that is not part of a CRLF line end (Python's reader ends lines there, a
byte scan for ``\\n`` would not).
"""
from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from data_prep.manifest import MANIFEST_EXTENSIONS, Manifest, ManifestError, RowRange

BOM = b"\xef\xbb\xbf"
_ASCII_SPACE = b" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"  # the ASCII bytes str.strip() removes
_QUOTE = b'"'
_ASCII = re.compile(rb"[\x00-\x7f]")


class _LoneCarriageReturn(Exception):
    """The file ends a line at a lone ``\\r``: only Python's own reader counts its lines right."""


def shard_ranges(manifest: Manifest, shard_size: int) -> list[RowRange] | None:
    """One ``RowRange`` per shard of ``shard_size`` rows, or ``None`` where the rows must be read
    by the driver (see the module's docstring).

    Raises:
        ManifestError: what ``open_records`` raises for the header or the first row.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if not splittable(manifest):
        return None
    manifest.check()
    kind = manifest.kind
    if kind == ".parquet":
        return _parquet_ranges(manifest, shard_size)
    try:
        with open(manifest.source, "rb") as f:
            lines = _lines(f)
            starts = _jsonl_rows(lines) if kind == ".jsonl" else _csv_rows(lines, MANIFEST_EXTENSIONS[kind])
            return _ranges(starts, shard_size)
    except _LoneCarriageReturn:
        return None


def splittable(manifest: Manifest) -> bool:
    """Whether ``manifest`` is of a kind whose ranges can be found: an uncompressed CSV/TSV/JSONL/Parquet
    (a CSV or JSONL one may still hold a lone carriage return, see ``shard_ranges``)."""
    return manifest.source.suffix.lower() != ".gz" and manifest.kind in (".csv", ".tsv", ".jsonl", ".parquet")


def _parquet_ranges(manifest: Manifest, shard_size: int) -> list[RowRange]:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(manifest.source).metadata
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ...
        raise ManifestError(f"{manifest.source} is not a readable Parquet file ({err})") from None
    ranges, group_start, total = [], 0, meta.num_rows
    group = 0
    for first in range(0, total, shard_size):
        while first >= group_start + meta.row_group(group).num_rows:
            group_start += meta.row_group(group).num_rows
            group += 1
        ranges.append(RowRange(first, min(shard_size, total - first), group, first - group_start))
    return ranges


@dataclass(frozen=True)
class _Line:
    offset: int  # of the line's first byte
    number: int  # 0-based
    body: bytes  # without its line end


def _lines(f: BinaryIO) -> Iterator[_Line]:
    offset = 0
    for number, line in enumerate(f):
        body = line[:-2] if line.endswith(b"\r\n") else line[:-1] if line.endswith(b"\n") else line
        if b"\r" in body:
            raise _LoneCarriageReturn
        yield _Line(offset, number, body[len(BOM):] if number == 0 and body.startswith(BOM) else body)
        offset += len(line)


def _ranges(starts: Iterator[_Line], shard_size: int) -> list[RowRange]:
    """Ranges from the first line of every row; the last range holds the rows left."""
    ranges: list[RowRange] = []
    rows = 0
    for rows, line in enumerate(starts, 1):
        if (rows - 1) % shard_size == 0:
            ranges.append(RowRange(rows - 1, shard_size, line.offset, line.number))
    if ranges:
        last = ranges[-1]
        ranges[-1] = RowRange(last.first_index, rows - last.first_index, last.start, last.before)
    return ranges


def _may_be_blank(data: bytes, also: bytes = b"") -> bool:
    """False when ``data`` holds an ASCII byte that ``str.strip`` keeps (and not in ``also``): a
    character that is not blank. True leaves it to decoding (non-ASCII spaces are blank too)."""
    return _ASCII.search(data.translate(None, _ASCII_SPACE + also)) is None


def _jsonl_rows(lines: Iterator[_Line]) -> Iterator[_Line]:
    """The first line of every row: the lines that are not blank (as ``read_jsonl`` counts them)."""
    for line in lines:
        if not _may_be_blank(line.body) or line.body.decode("utf-8", "surrogateescape").strip():
            yield line


def _csv_patterns(delimiter: str) -> tuple[re.Pattern[bytes], re.Pattern[bytes]]:
    """``(record, rest)``: a line that is whole records (it ends outside quotes), and a line
    that ends the quoted field an earlier line left open. The ``csv`` module's rules: a field
    that starts with ``"`` is quoted until a ``"`` that is not doubled, and whatever follows it
    up to the delimiter is kept as is; a ``"`` anywhere else is an ordinary character."""
    d = re.escape(delimiter.encode())
    quoted_rest = rb'(?>(?:[^"]|"")*+)"[^' + d + rb"]*+"
    field = rb'(?:"' + quoted_rest + rb'|[^"' + d + rb"][^" + d + rb"]*+|)"
    fields = rb"(?:" + d + field + rb")*+"
    return re.compile(field + fields), re.compile(quoted_rest + fields)


def _csv_rows(lines: Iterator[_Line], delimiter: str) -> Iterator[_Line]:
    """The first line of every data row (as ``read_delimited`` counts them: after the header,
    not all cells blank)."""
    record, rest = _csv_patterns(delimiter)
    skip = _QUOTE + delimiter.encode()
    header = True
    for first in lines:
        parts = [first.body]
        if _QUOTE in first.body and not record.fullmatch(first.body):
            for line in lines:  # a quoted field runs on: the record ends where it is closed
                parts.append(line.body)
                if rest.fullmatch(line.body):
                    break
        if header:
            header = False
        elif not all(_may_be_blank(p, skip) for p in parts) or _cells_not_blank(b"\n".join(parts), delimiter):
            yield first


def _cells_not_blank(data: bytes, delimiter: str) -> bool:
    """Whether the record in ``data`` has a cell that is not blank (decoded, for non-ASCII spaces)."""
    text = data.decode("utf-8", "surrogateescape")
    row = next(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter), [])
    return any(cell.strip() for cell in row)
