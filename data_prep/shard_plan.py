"""The shard jobs of a run: which shards are left to build, and where each one's rows come from.

Both engines run the same jobs with ``run_job``: the local loop and its worker processes, and
the Ray tasks. A job carries its rows, read by the driver, or (a Ray run over an uncompressed
CSV/TSV/JSONL/Parquet manifest) only the ``RowRange`` its task reads itself, so the driver
never reads the whole manifest. A shard complete from an earlier run has no job; with
``retry_failed`` a complete shard whose rows failed for a retryable reason gets a job for just
those rows (see ``data_prep.retry``).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from data_prep.manifest import Manifest
from data_prep.ranges import RowRange, read_range
from data_prep.records import Record
from data_prep.retry import rows_to_retry
from data_prep.sample import SampleConfig
from data_prep.shard_job import ShardResult, build_shard, shard_is_complete
from data_prep.splits import shard_ranges

Input = Iterable[Record] | Manifest


@dataclass(frozen=True)
class ShardJob:
    """One shard to build: its rows, or the manifest range a task reads them from.

    Attributes:
        shard_id: The shard.
        rows: The shard's records, or the ``RowRange`` of ``manifest`` that holds them.
        manifest: The input, where ``rows`` is a range.
        only: ``--retry-failed``: build just the rows of these indices.
    """

    shard_id: int
    rows: tuple[Record, ...] | RowRange
    manifest: Manifest | None = None
    only: frozenset[int] | None = None

    def records(self) -> list[Record]:
        """The records to build (reading the range, if the job holds one)."""
        if isinstance(self.rows, RowRange):
            assert self.manifest is not None
            records = list(read_range(self.manifest, self.rows))
        else:
            records = list(self.rows)
        return records if self.only is None else [r for r in records if r.index in self.only]


def run_job(job: ShardJob, out_dir: str, config: SampleConfig, threads: int, encoders: int) -> ShardResult:
    """Build ``job``'s shard into a temporary tar in ``out_dir`` (see ``shard_job.build_shard``)."""
    return build_shard(job.shard_id, job.records(), out_dir, config, threads, encoders)


def plan_shards(records: Iterable[Record], shard_size: int) -> Iterator[tuple[int, list[Record]]]:
    """``(shard id, its rows)``: consecutive runs of ``shard_size`` records, streamed."""
    it = iter(records)
    for shard_id in itertools.count():
        rows = list(itertools.islice(it, shard_size))
        if not rows:
            return
        yield shard_id, rows


def plan_jobs(
    source: Input, shard_size: int, out_dir: Path, *, ranges: bool = False, retry_failed: bool = False
) -> Iterator[tuple[int, ShardJob | None]]:
    """``(shard id, its job)`` in shard order; ``None`` for a shard with nothing left to do.

    Args:
        source: The input rows, or a manifest to read them from.
        shard_size: Rows per shard.
        out_dir: The output folder (its complete shards are skipped).
        ranges: Let tasks read their own rows where ``source`` is a manifest that can be split.
        retry_failed: Give complete shards a job for their retryable failed rows.
    """
    split = shard_ranges(source, shard_size) if ranges and isinstance(source, Manifest) else None
    if split is not None:
        shards: Iterable[tuple[int, tuple[Record, ...] | RowRange]] = enumerate(split)
    else:
        records = source.records() if isinstance(source, Manifest) else source
        shards = ((i, tuple(rows)) for i, rows in plan_shards(records, shard_size))
    manifest = source if split is not None else None
    for shard_id, rows in shards:
        if not shard_is_complete(out_dir, shard_id):
            yield shard_id, ShardJob(shard_id, rows, manifest)
        elif retry_failed and (only := rows_to_retry(out_dir, shard_id)):
            if not isinstance(rows, RowRange):  # ship just those rows
                rows = tuple(r for r in rows if r.index in only)
            yield shard_id, ShardJob(shard_id, rows, manifest, only)
        else:
            yield shard_id, None
