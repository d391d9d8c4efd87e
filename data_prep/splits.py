"""Where each shard's rows start in a manifest file, found without reading the rows.

A Ray run's driver hands every task a ``RowRange`` (see ``data_prep.ranges``) and the task
reads its own rows with ``read_range``, so the driver never parses the manifest:

* Parquet: the row groups' row counts in the file's footer give each range's first row group
  and the rows to skip in it.
* CSV/TSV/JSONL: one pass over the bytes finds the line where every ``shard_size``-th row
  starts. Rows are lines that are not blank (JSONL) or records that are not all blank cells
  (CSV); a CSV record runs on past a line end inside a quoted field, which a regular
  expression of the ``csv`` module's rules (default dialect) tells from the line's bytes.
  Only lines that could be blank are decoded. The pass costs about half a full read (0.3 s
  of CPU for 200k CSV rows, two thirds of them quoted, on the 2-core project machine): a
  Parquet manifest, whose footer alone is read, suits inputs of billions of rows better.

``shard_ranges`` gives ``None`` where the driver must read the rows itself: folders, COCO
files, ``.gz`` manifests (a gzip stream has no offsets to seek to), and text holding a
carriage return that is not part of a CRLF line end (Python's reader ends lines there, a
byte scan for ``\\n`` would not).
"""
from __future__ import annotations

import csv
import io
import re
from typing import BinaryIO, Iterable, Iterator

from data_prep.manifest import MANIFEST_EXTENSIONS, Manifest, ManifestError
from data_prep.ranges import RowRange
from data_prep.records import Record

BOM = b"\xef\xbb\xbf"
_ASCII_SPACE = b" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"  # the ASCII bytes str.strip() removes
_QUOTE = b'"'


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


def prep_input(manifest: Manifest, engine: str) -> Iterable[Record] | Manifest:
    """What a prep run on ``engine`` reads: the manifest itself where Ray's tasks can read their own
    row ranges (its header checked here), else its records (opened here). Either way a bad header
    raises ``ManifestError`` now, before a run deletes anything."""
    if engine == "ray" and splittable(manifest):
        manifest.check()
        return manifest
    return manifest.records()


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


# A line is (offset of its first byte, 0-based line number, its bytes without the line end).
Line = tuple[int, int, bytes]


def _lines(f: BinaryIO) -> Iterator[Line]:
    offset = 0
    for number, line in enumerate(f):
        body = line[:-2] if line[-2:] == b"\r\n" else line[:-1] if line[-1:] == b"\n" else line
        if b"\r" in body:
            raise _LoneCarriageReturn
        yield offset, number, body[len(BOM):] if number == 0 and body[:3] == BOM else body
        offset += len(line)


def _ranges(starts: Iterator[Line], shard_size: int) -> list[RowRange]:
    """Ranges from the first line of every row; the last range holds the rows left."""
    ranges: list[RowRange] = []
    rows = 0
    for rows, (offset, number, _) in enumerate(starts, 1):
        if (rows - 1) % shard_size == 0:
            ranges.append(RowRange(rows - 1, shard_size, offset, number))
    if ranges:
        last = ranges[-1]
        ranges[-1] = RowRange(last.first_index, rows - last.first_index, last.start, last.before)
    return ranges


def _not_blank(also: bytes = b"") -> re.Pattern[bytes]:
    """Finds an ASCII byte that ``str.strip`` keeps (and that is not in ``also``): a line or
    record with one is not blank; one without is decoded to tell (non-ASCII spaces are blank too)."""
    return re.compile(b"[^\\x80-\\xff" + re.escape(_ASCII_SPACE + also) + b"]")


def _jsonl_rows(lines: Iterator[Line]) -> Iterator[Line]:
    """The first line of every row: the lines that are not blank (as ``read_jsonl`` counts them)."""
    not_blank = _not_blank().search
    for line in lines:
        if not_blank(line[2]) or line[2].decode("utf-8", "surrogateescape").strip():
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


def _csv_rows(lines: Iterator[Line], delimiter: str) -> Iterator[Line]:
    """The first line of every data row (as ``read_delimited`` counts them: after the header,
    not all cells blank)."""
    not_blank = _not_blank(_QUOTE + delimiter.encode()).search
    records = _csv_records(lines, delimiter)
    next(records, None)  # the header
    for first, parts in records:
        if not_blank(first[2]) or (parts and any(map(not_blank, parts))) or \
                _cells_not_blank(b"\n".join(parts or [first[2]]), delimiter):
            yield first


def _csv_records(lines: Iterator[Line], delimiter: str) -> Iterator[tuple[Line, list[bytes] | None]]:
    """``(first line, None)`` for a record of one line; ``(first line, every line's bytes)`` for more."""
    record, rest = (p.fullmatch for p in _csv_patterns(delimiter))
    for first in lines:
        body = first[2]
        if _QUOTE not in body or record(body):
            yield first, None
            continue
        parts = [body]
        for line in lines:  # a quoted field runs on: the record ends where it is closed
            parts.append(line[2])
            if rest(line[2]):
                break
        yield first, parts


def _cells_not_blank(data: bytes, delimiter: str) -> bool:
    """Whether the record in ``data`` has a cell that is not blank (decoded, for non-ASCII spaces)."""
    text = data.decode("utf-8", "surrogateescape")
    row = next(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter), [])
    return any(cell.strip() for cell in row)
