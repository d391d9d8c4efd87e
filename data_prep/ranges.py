"""A manifest's records read from a row range (``RowRange``), where a Ray task starts its shard.

``data_prep.splits`` finds where each shard's rows start without parsing them; ``read_range``
then reads just those rows, with the same readers (and the same records, line numbers and
skip details) that ``data_prep.manifest`` uses for the whole file.
"""
from __future__ import annotations

import csv
import io
import itertools
from dataclasses import dataclass
from typing import Any, Iterator

from data_prep.manifest import (
    MANIFEST_EXTENSIONS,
    PARQUET_BATCH_ROWS,
    Manifest,
    _delimited_columns,
    _delimited_rows,
    _extra_names,
    _guarded,
    _jsonl_rows,
    _open_text,
    _parquet_file,
    _parquet_rows,
)
from data_prep.records import Record


@dataclass(frozen=True)
class RowRange:
    """Records ``[first_index, first_index + rows)`` of a manifest file, and where they start in it.

    Attributes:
        first_index: The index of the range's first record.
        rows: Records in the range (fewer only where the file ends first).
        start: CSV/TSV/JSONL: byte offset of the first record's first line; Parquet: its row group.
        before: CSV/TSV/JSONL: the file's lines before ``start`` (line numbers in details count
            from the file's start); Parquet: the rows of that row group before the first record.
    """

    first_index: int
    rows: int
    start: int
    before: int


def read_range(manifest: Manifest, rows: RowRange) -> Iterator[Record]:
    """The records of ``rows``, read from where they start: the same records, details included,
    that ``manifest.records()`` gives for those indices.

    Only for an uncompressed ``.csv``/``.tsv``/``.jsonl``/``.parquet`` manifest, and only for a
    range whose ``start`` is where one of its records begins (``data_prep.splits`` finds them).
    """
    path, kind = manifest.source, manifest.kind
    extra_cols = None if manifest.extra_cols is None else list(manifest.extra_cols)
    if path.suffix.lower() == ".gz" or kind not in (".csv", ".tsv", ".jsonl", ".parquet"):
        raise ValueError(f"{path}: only uncompressed CSV/TSV/JSONL/Parquet manifests are read by range")
    if kind == ".parquet":
        records = _parquet_range(manifest, rows, extra_cols)
    else:
        encoding = "utf-8-sig" if rows.start == 0 else "utf-8"  # a BOM can only be at the start
        f = io.TextIOWrapper(open(path, "rb"), encoding=encoding, errors="surrogateescape", newline="")
        try:
            f.buffer.seek(rows.start)
            if kind == ".jsonl":
                lines = enumerate(f, rows.before + 1)
                records = _jsonl_rows(f, lines, path.parent, manifest.image_col, manifest.caption_col, extra_cols,
                                      rows.first_index)
            else:
                delimiter = MANIFEST_EXTENSIONS[kind]
                with _open_text(path) as head:
                    header = next(csv.reader(head, delimiter=delimiter), None)
                columns = _delimited_columns(path, header, manifest.image_col, manifest.caption_col, extra_cols)
                reader = csv.reader(f, delimiter=delimiter)
                records = _delimited_rows(f, reader, path.parent, columns, rows.first_index, rows.before)
        except BaseException:
            f.close()
            raise
        records = _guarded(records, path)
    return itertools.islice(records, rows.rows)


def _parquet_range(manifest: Manifest, rows: RowRange, extra_cols: list[str] | None) -> Iterator[Record]:
    pf = _parquet_file(manifest.source, None)
    image_col, caption_col = manifest.image_col, manifest.caption_col
    extras = _extra_names(pf.schema_arrow.names, (image_col, caption_col), extra_cols, manifest.source)
    groups, covered = [], -rows.before
    for group in range(rows.start, pf.metadata.num_row_groups):
        if covered >= rows.rows:
            break
        groups.append(group)
        covered += pf.metadata.row_group(group).num_rows
    batches = pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=groups, columns=[image_col, caption_col, *extras])
    return _parquet_rows(_skip_rows(batches, rows.before), None, manifest.source.parent, image_col, caption_col,
                         extras, rows.first_index)


def _skip_rows(batches: Iterator[Any], n: int) -> Iterator[Any]:
    """``batches`` without their first ``n`` rows."""
    for batch in batches:
        if n >= batch.num_rows:
            n -= batch.num_rows
            continue
        yield batch.slice(n) if n else batch
        n = 0
