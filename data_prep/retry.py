"""``--retry-failed``: fetch again only the rows that failed for a reason that may pass.

A finished shard's parquet lists every row's status and reason. The rows whose download
failed for a reason a later attempt may not meet (``data_prep.fetch.is_retryable``) are fetched and encoded
again, in a job of their own; ``merge_retried`` then puts their outcomes in their places among
the shard's kept samples and rows, so the shard comes out exactly as a run in which those
rows had gone so the first time would have written it. Shards without such rows are not
touched.
"""
from __future__ import annotations

import heapq
import os
import tarfile
import uuid
from pathlib import Path
from typing import AbstractSet, Any, Iterator

from data_prep.fetch import RETRYABLE_REASONS, is_retryable
from data_prep.shard_job import (
    SHARD_FILE,
    SUCCESS,
    ShardResult,
    dedup_key,
    read_shard_rows,
    read_shard_stats,
    shard_name,
)
from data_prep.shards import TarShard


def rows_to_retry(out_dir: Path, shard_id: int) -> frozenset[int]:
    """The indices of a complete shard's rows that failed for a retryable reason."""
    if not RETRYABLE_REASONS & set(read_shard_stats(out_dir, shard_id)["skipped_by_reason"]):
        return frozenset()  # the parquet is read only where the stats name a retryable reason
    rows = read_shard_rows(out_dir, shard_id, ("index", "status", "error_reason", "error_detail"))
    return frozenset(i for i, status, reason, detail in zip(rows["index"], rows["status"], rows["error_reason"],
                                                           rows["error_detail"])
                     if status != SUCCESS and is_retryable(reason, detail))


def written_digests(out_dir: Path) -> set[bytes]:
    """The dedup keys of every sample the complete shards in ``out_dir`` hold."""
    digests: set[bytes] = set()
    for path in out_dir.iterdir():
        if SHARD_FILE.fullmatch(path.name) and path.name.endswith("_stats.json"):
            shard_id = int(path.name.split("_", 1)[0])
            rows = read_shard_rows(out_dir, shard_id, ("status", "sha256"))
            digests.update(dedup_key(h) for s, h in zip(rows["status"], rows["sha256"]) if s == SUCCESS)
    return digests


def merge_retried(out_dir: Path, result: ShardResult, dropped: AbstractSet[str] = frozenset()) -> ShardResult:
    """A complete shard with the refetched rows of ``result`` in their places: all its rows, and a
    temporary tar of its kept samples and the new ones (less ``dropped``) in key order, written as
    a fresh build writes them. ``result``'s temporary tar is removed."""
    import pyarrow.parquet as pq

    name = shard_name(result.shard_id)
    new = {row["index"]: row for row in result.rows}
    rows = [new.get(row["index"], row) for row in pq.read_table(out_dir / f"{name}.parquet").to_pylist()]
    merged = out_dir / f"{name}.tar.{uuid.uuid4().hex[:16]}.merged.tmp"
    with TarShard(merged) as tar:
        old, refetched = _samples(out_dir / f"{name}.tar"), _samples(Path(result.tmp_tar))
        for sample in heapq.merge(old, refetched, key=lambda s: int(s["__key__"])):  # row order
            if sample["__key__"] not in dropped:
                tar.write(sample)
    os.unlink(result.tmp_tar)
    return ShardResult(result.shard_id, str(merged), rows)


def _samples(path: Path) -> Iterator[dict[str, Any]]:
    """The samples of a tar that ``TarShard`` wrote: members ``<key>.<field>``, a sample's together."""
    sample: dict[str, Any] = {}
    with tarfile.open(path) as tar:
        for info in tar:
            key, field = info.name.split(".", 1)
            if sample and sample["__key__"] != key:
                yield sample
                sample = {}
            sample.setdefault("__key__", key)
            sample[field] = tar.extractfile(info).read()
    if sample:
        yield sample
