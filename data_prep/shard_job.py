"""One shard as one unit of work: build it in a worker, commit it in the main process.

Shard ``i`` holds the samples of input rows ``[i * S, (i + 1) * S)``, so every shard can
be built independently and the output never depends on the number of workers.

* ``build_shard`` (worker): ``threads`` threads read or download the rows' images ahead
  (downloads run in libcurl, without the GIL), a few more decode and re-encode them (as
  many as the worker's share of the cores: more only contend for caches and the GIL), and
  it writes ``NNNNN.tar.<random>.tmp`` in row order (a name of its own, so that two builds of one
  shard, a retry beside a worker thought dead on another node, never write one file).
* ``commit_shard`` (main process, in shard order): drops exact duplicates of earlier
  images, then writes ``NNNNN.parquet``, renames the tar to ``NNNNN.tar`` and writes
  ``NNNNN_stats.json`` last. A shard is complete when its tar and stats file exist.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from clipalign.formats.atomic import naming, replace_file, write_json
from clipalign.formats.skips import DUPLICATE
from data_prep.fetch import Downloader
from data_prep.records import Record
from data_prep.resample import single_thread
from data_prep.sample import (
    Fetched,
    Outcome,
    SampleConfig,
    safe_encode_record,
    safe_fetch_record,
    safe_process_record,
)
from data_prep.shards import TarShard, filter_tar

SUCCESS = "success"
FAILED = "failed"

_PARQUET_COLUMNS = [
    ("key", "string"), ("index", "int64"), ("source", "string"), ("caption", "string"), ("status", "string"),
    ("error_reason", "string"), ("error_detail", "string"), ("width", "int32"), ("height", "int32"),
    ("original_width", "int32"), ("original_height", "int32"), ("sha256", "string"), ("extra", "string"),
]


def shard_name(shard_id: int) -> str:
    """``00042`` for shard 42 (the tar is ``00042.tar``)."""
    return f"{shard_id:05d}"


SHARD_FILE = re.compile(r"\d{5,}(\.tar|\.parquet|_stats\.json)")  # what shard_name's files are called


def shard_is_complete(out_dir: Path, shard_id: int) -> bool:
    """A shard is done once its tar and its ``_stats.json`` (written last) both exist."""
    name = shard_name(shard_id)
    return (out_dir / f"{name}.tar").is_file() and (out_dir / f"{name}_stats.json").is_file()


@dataclass(frozen=True)
class ShardResult:
    """What a worker hands back for one shard: the tmp tar and one metadata row per input row."""

    shard_id: int
    tmp_tar: str
    rows: list[dict[str, Any]]


def _row(outcome: Outcome) -> dict[str, Any]:
    r, meta = outcome.record, outcome.meta or {}
    return {
        "key": r.key, "index": r.index, "source": r.source, "caption": meta.get("caption", r.caption),
        "status": SUCCESS if outcome.sample is not None else FAILED,
        "error_reason": outcome.reason, "error_detail": outcome.detail,
        "width": meta.get("width"), "height": meta.get("height"),
        "original_width": meta.get("original_width"), "original_height": meta.get("original_height"),
        "sha256": outcome.sha256,
        "extra": json.dumps(r.extra, ensure_ascii=False, sort_keys=True, default=str) if r.extra else None,
    }


def encode_threads(workers: int) -> int:
    """Decode/encode threads for each of ``workers`` processes: their share of this process's cores."""
    return max(1, len(os.sched_getaffinity(0)) // workers) if hasattr(os, "sched_getaffinity") else 1


def _outcomes(records: list[Record], config: SampleConfig, threads: int, encoders: int) -> Iterator[Outcome]:
    """Outcomes in record order: ``threads`` fetch ahead, ``encoders`` encode, at most ``2 * threads`` in flight."""
    with ExitStack() as stack:
        # Each fetch thread downloads through its own curl handle (its kept-alive connections).
        downloader = stack.enter_context(Downloader()) if any(r.url is not None for r in records) else None
        if threads == 1 and encoders == 1:
            for r in records:
                yield safe_process_record(r, config, downloader)
            return
        fetch_pool = stack.enter_context(ThreadPoolExecutor(threads, thread_name_prefix="fetch"))
        encode_pool = stack.enter_context(ThreadPoolExecutor(encoders, thread_name_prefix="encode"))
        pending: deque[Future[Outcome]] = deque()
        for r in records:
            fetched = fetch_pool.submit(safe_fetch_record, r, config, downloader)
            # Encoding jobs start in record order, each waiting for its own download.
            pending.append(encode_pool.submit(_encode_when_fetched, fetched, config))
            if len(pending) >= 2 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _encode_when_fetched(fetched: Future[Fetched | Outcome], config: SampleConfig) -> Outcome:
    return safe_encode_record(fetched.result(), config)


@contextlib.contextmanager
def _cleaned_up(target: Path, *tmps: Path) -> Iterator[None]:
    """On any failure remove the temporary files ``tmps``; an ``OSError`` (a full disk, a
    read-only folder) is raised again naming ``target``, the shard file they were for."""
    try:
        yield
    except BaseException as err:
        for tmp in tmps:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise naming(err, target, *tmps) from None
        raise


def build_shard(
    shard_id: int, records: list[Record], out_dir: str, config: SampleConfig, threads: int, encoders: int = 1
) -> ShardResult:
    """Process ``records`` and write their samples to a temporary tar (worker side).

    Args:
        shard_id, records: The shard and its input rows.
        out_dir: Where the temporary tar goes.
        config: How each record becomes a sample.
        threads: Images read or downloaded at once.
        encoders: Images decoded and re-encoded at once (see ``encode_threads``).

    Raises:
        OSError: the tar could not be written (a full disk, ...), naming ``NNNNN.tar``; the
            temporary tar is removed.
    """
    tmp = Path(out_dir) / f"{shard_name(shard_id)}.tar.{uuid.uuid4().hex[:16]}.tmp"  # a pid repeats across nodes
    rows = []
    # One torch thread: the encoding threads keep the cores busy, and each resize is small.
    with _cleaned_up(Path(out_dir) / f"{shard_name(shard_id)}.tar", tmp), single_thread(), TarShard(tmp) as tar:
        for outcome in _outcomes(records, config, threads, encoders):
            if outcome.sample is not None:
                tar.write(outcome.sample)
            rows.append(_row(outcome))
    return ShardResult(shard_id, str(tmp), rows)


def dedup_key(sha256_hex: str) -> bytes:
    """The first 128 bits of the digest: collisions stay negligible at ~80 bytes per image held."""
    return bytes.fromhex(sha256_hex)[:16]


def _write_parquet(path: Path, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in _PARQUET_COLUMNS])
    replace_file(path, lambda tmp: pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp))


def commit_shard(out_dir: Path, result: ShardResult, seen: set[bytes] | None) -> dict[str, Any]:
    """Finish a built shard: dedup against ``seen`` (updated; ``None`` = no dedup), write, rename.

    Returns:
        The shard's stats, as saved in ``NNNNN_stats.json``.

    Raises:
        OSError: a file could not be written (a full disk, ...), naming it; the shard's
            temporary files are removed (the shard is incomplete: a re-run builds it again).
    """
    name = shard_name(result.shard_id)
    tmp = Path(result.tmp_tar)
    filtered = tmp.with_name(f"{tmp.name}.dedup")
    with _cleaned_up(out_dir / f"{name}.tar", tmp, filtered):
        return _commit(out_dir, name, result.rows, tmp, filtered, seen)


def mark_duplicates(rows: list[dict[str, Any]], seen: set[bytes]) -> set[str]:
    """Mark the written ``rows`` whose image bytes are in ``seen`` as duplicates (the others join
    ``seen``); return their keys. The sample written first is the one kept."""
    dropped = set()
    for row in rows:
        if row["status"] == SUCCESS:
            digest = dedup_key(row["sha256"])
            if digest in seen:
                row.update(status=FAILED, error_reason=DUPLICATE, error_detail="same image bytes as an earlier sample")
                dropped.add(row["key"])
            else:
                seen.add(digest)
    return dropped


def _commit(out_dir: Path, name: str, rows: list[dict[str, Any]], tmp: Path, filtered: Path,
            seen: set[bytes] | None) -> dict[str, Any]:
    """``commit_shard``'s work: the temporary files are its caller's to remove on failure."""
    if seen is not None:
        dropped = mark_duplicates(rows, seen)
        if dropped:
            filter_tar(tmp, filtered, dropped)
            os.replace(filtered, tmp)
    _write_parquet(out_dir / f"{name}.parquet", rows)
    os.replace(tmp, out_dir / f"{name}.tar")
    reasons = Counter(row["error_reason"] for row in rows if row["status"] != SUCCESS)
    written = sum(row["status"] == SUCCESS for row in rows)
    stats = {
        "shard": f"{name}.tar",
        "first_index": rows[0]["index"] if rows else None,
        "rows": len(rows),
        "written": written,
        "skipped": len(rows) - written,
        "skipped_by_reason": dict(sorted(reasons.items())),
    }
    write_json(out_dir / f"{name}_stats.json", stats)
    return stats


def read_shard_stats(out_dir: Path, shard_id: int) -> dict[str, Any]:
    """The saved stats of a complete shard."""
    return json.loads((out_dir / f"{shard_name(shard_id)}_stats.json").read_text(encoding="utf-8"))


def read_shard_rows(out_dir: Path, shard_id: int, columns: Iterable[str]) -> dict[str, list[Any]]:
    """Columns of a complete shard's parquet, as lists."""
    import pyarrow.parquet as pq

    return pq.read_table(out_dir / f"{shard_name(shard_id)}.parquet", columns=list(columns)).to_pydict()
