"""Compose reader -> shard jobs -> commit: image-caption records into WebDataset shards.

``run_prep`` is the whole pipeline. Rows are cut into shards of ``shard_size``
consecutive rows (shard ``i`` = rows ``[i * S, (i + 1) * S)``; skipped rows leave a
shard with fewer samples), each built by a worker process or a Ray task (see
``data_prep.shard_plan`` and ``data_prep.shard_job``) and committed in order, so the output is byte-identical for any number of workers.

Outputs in ``out_dir``: per shard ``NNNNN.tar``, ``NNNNN.parquet`` (one row per input
row, with its status) and ``NNNNN_stats.json``; for the run ``stats.json``,
``sizes.json`` (shard -> samples), ``errors.jsonl`` (one line per skipped row) and
``prep_config.json`` (the options, checked when a run resumes).

Re-running into the same folder resumes: complete shards are kept, the rest redone;
``retry_failed`` also fetches again the rows that failed for a retryable reason
(``data_prep.retry``). ``engine="ray"`` builds the shards in Ray tasks
(``data_prep.ray_prep``) and commits them here, in order, as the local loop does.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import time
from collections import Counter, deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from clipalign.formats.atomic import replace_file, write_json
from data_prep.manifest import Manifest
from clipalign.memory import keep_freed_memory
from data_prep.retry import merge_retried, written_digests
from data_prep.sample import SampleConfig
from data_prep.shard_job import (
    SHARD_FILE,
    SUCCESS,
    ShardResult,
    commit_shard,
    dedup_key,
    encode_threads,
    mark_duplicates,
    read_shard_rows,
    read_shard_stats,
    shard_name,
)
from data_prep.shard_plan import Input, ShardJob, plan_jobs, plan_shards, run_job  # noqa: F401  (plan_shards: API)

CONFIG_FILE = "prep_config.json"
STATS_FILE, SIZES_FILE, ERRORS_FILE = "stats.json", "sizes.json", "errors.jsonl"
RUN_FILES = (STATS_FILE, SIZES_FILE, ERRORS_FILE, CONFIG_FILE)
TMP_PATTERNS = ("*.tmp", "*.tmp.dedup")  # every temporary name of a run ends so
ENGINES = ("local", "ray")


class ResumeMismatch(ValueError):
    """``out_dir`` holds shards made with other options or from another input."""


class WorkerDied(RuntimeError):
    """A worker process building shards died; what was committed is kept for a re-run."""


@dataclass(frozen=True)
class PrepConfig:
    """How samples are processed and sharded.

    Attributes:
        sample: Per-sample options (image size, format, filters, downloads, tokenizer).
        shard_size: Input rows per shard (a shard holds at most this many samples).
        workers: Processes building shards; output is identical for any value.
        threads: Images each worker reads or downloads at once; each also decodes with
            its share of the cores.
        dedup: Drop samples whose original image bytes equal an earlier sample's.
    """

    sample: SampleConfig = field(default_factory=SampleConfig)
    shard_size: int = 10_000
    workers: int = 1
    threads: int = 4
    dedup: bool = False

    def __post_init__(self) -> None:
        for name in ("shard_size", "workers", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def output_options(self) -> dict[str, Any]:
        """The options that shape the output (not ``workers``/``threads``), JSON-ready."""
        options = asdict(self)
        del options["workers"], options["threads"]
        return json.loads(json.dumps(options))


def _local_results(
    plan: Iterable[tuple[int, ShardJob | None]], out_dir: Path, config: PrepConfig
) -> Iterator[tuple[int, ShardJob | None, ShardResult | None]]:
    """``(shard id, job, result)`` in shard order, built here or in ``config.workers`` processes;
    no result where there is no job.

    With several workers at most ``2 * workers`` shards are in flight, so memory stays
    flat whatever the input's length. On an error the queued shards are dropped and the
    running ones finish before it is raised (``multiprocessing.Pool`` would kill them, and a
    worker killed while sending its result leaves a lock held and the run hung); a worker
    that dies (the system's out-of-memory killer) raises ``WorkerDied`` instead of a hang.
    """
    args = (str(out_dir), config.sample, config.threads, encode_threads(config.workers))
    if config.workers == 1:
        for shard_id, job in plan:
            yield shard_id, job, None if job is None else run_job(job, *args)
        return
    import torch  # noqa: F401  (for the resizes: imported once here, shared by the forked workers)

    pool = ProcessPoolExecutor(config.workers, multiprocessing.get_context("fork"), initializer=keep_freed_memory)
    pending: deque[tuple[int, ShardJob | None, Future[ShardResult] | None]] = deque()
    try:
        for shard_id, job in plan:
            pending.append((shard_id, job, None if job is None else pool.submit(run_job, job, *args)))
            while len(pending) >= 2 * config.workers:
                yield _first_done(pending)
        while pending:
            yield _first_done(pending)
    except BrokenProcessPool:
        raise WorkerDied(f"a prep worker process died (killed by the system? out of memory?) while building "
                         f"{out_dir}; the shards committed are kept: run the same command again to resume") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _first_done(
    pending: deque[tuple[int, ShardJob | None, Future[ShardResult] | None]]
) -> tuple[int, ShardJob | None, ShardResult | None]:
    shard_id, job, future = pending.popleft()
    return shard_id, job, None if future is None else future.result()


def _check_resume(out_dir: Path, options: dict[str, Any]) -> None:
    path = out_dir / CONFIG_FILE
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old != options:
            changed = sorted(k for k in set(old) | set(options) if old.get(k) != options.get(k))
            raise ResumeMismatch(f"{out_dir} holds shards made with other options ({', '.join(changed)} differ)")
    elif any(SHARD_FILE.fullmatch(p.name) for p in out_dir.iterdir()):
        raise ResumeMismatch(f"{out_dir} holds shards from an unknown run")
    write_json(path, options)


def _remove_tmp_files(out_dir: Path) -> None:
    """Leftovers of a killed run."""
    for pattern in TMP_PATTERNS:
        for p in out_dir.glob(pattern):
            p.unlink(missing_ok=True)


def clear_outputs(out_dir: str | os.PathLike) -> None:
    """Delete what prep runs wrote into ``out_dir`` (shards, their tables and stats, run files,
    temporary files), leaving anything else there alone.

    Raises:
        NotADirectoryError: ``out_dir`` exists and is not a folder.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} exists and is not a folder")
    if not out_dir.is_dir():
        return
    _remove_tmp_files(out_dir)
    for p in out_dir.iterdir():
        if SHARD_FILE.fullmatch(p.name) or p.name in RUN_FILES:
            p.unlink()


def _write_errors(out_dir: Path, shards: list[tuple[int, dict[str, Any]]]) -> None:
    columns = ("index", "key", "source", "status", "error_reason", "error_detail")

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for shard_id, stats in shards:
                if not stats["skipped"]:
                    continue
                rows = read_shard_rows(out_dir, shard_id, columns)
                for index, key, source, status, reason, detail in zip(*(rows[c] for c in columns)):
                    if status != SUCCESS:
                        entry = {"index": index, "key": key, "source": source, "reason": reason, "detail": detail}
                        f.write(json.dumps(entry, ensure_ascii=False) + "\n")

    replace_file(out_dir / ERRORS_FILE, write)


def run_prep(
    records: Input,
    out_dir: str | os.PathLike,
    config: PrepConfig = PrepConfig(),
    *,
    source: str | None = None,
    progress: Callable[[int], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    engine: str = "local",
    ray_address: str | None = None,
    retry_failed: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write ``records`` as WebDataset shards plus per-shard and run-level metadata.

    Args:
        records: Input rows, e.g. from ``data_prep.manifest.open_records``, or a ``Manifest``
            (with ``engine="ray"``, tasks then read their own rows where it can be split).
        out_dir: Output folder (created if missing). If it holds a run of the same
            options and ``source``, that run is resumed. With ``engine="ray"`` every node
            must see it at the same path.
        config: Processing and sharding options.
        source: The input's name, recorded so a resume from another input is refused
            (default for a ``Manifest``: its resolved path).
        progress: Called with the number of rows after each shard (e.g. ``tqdm.update``).
        clock: Time source for ``duration_s``.
        engine: ``local`` (this machine: ``config.workers`` processes) or ``ray`` (one Ray
            task per shard, see ``data_prep.ray_prep``); the output is the same.
        ray_address: The Ray cluster for ``engine="ray"`` (None: ``$RAY_ADDRESS`` or a local Ray).
        retry_failed: Also fetch again the rows of complete shards that failed for a
            retryable reason (``data_prep.retry``), rewriting only their shards.
        overwrite: Delete what earlier runs wrote into ``out_dir`` first (``clear_outputs``).

    Returns:
        The stats dict also saved as ``stats.json``.

    Raises:
        ResumeMismatch: if ``out_dir`` holds shards of other options or another input.
        NotADirectoryError: ``out_dir`` exists and is not a folder.
        OSError: a file could not be written (a full disk, ...), naming it; no temporary
            file is left.
        WorkerDied: a worker process died (``engine="local"`` with several workers).
        RuntimeError, ConnectionError: ``engine="ray"`` without Ray, or without a cluster.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "ray":
        from clipalign.cluster import connect

        connect(ray_address)  # before anything is written or deleted
    out_dir = Path(out_dir)
    if overwrite:
        clear_outputs(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} exists and is not a folder")
    if source is None and isinstance(records, Manifest):
        source = str(records.source.resolve())
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_resume(out_dir, {**config.output_options(), "source": source})
    _remove_tmp_files(out_dir)
    start = clock()
    plan = plan_jobs(records, config.shard_size, out_dir, ranges=engine == "ray", retry_failed=retry_failed)
    if engine == "ray":
        from data_prep.ray_prep import ray_results

        results = ray_results(plan, out_dir, config.sample, config.threads, ray_address)
    else:
        results = _local_results(plan, out_dir, config)
    try:
        with contextlib.closing(results):  # stops the workers before the temporary files go
            shards, counts = _commit_all(results, out_dir, config, retry_failed, progress)
        _write_errors(out_dir, shards)
    finally:
        _remove_tmp_files(out_dir)  # what a failed run, or a task whose worker died, left
    duration = clock() - start
    reasons: Counter[str] = Counter()
    for _, s in shards:
        reasons.update(s["skipped_by_reason"])
    seen_rows = sum(s["rows"] for _, s in shards)
    written = sum(s["written"] for _, s in shards)
    stats = {
        "seen": seen_rows,
        "written": written,
        "skipped": seen_rows - written,
        "by_status": {"success": written, "failed": seen_rows - written},
        "skipped_by_reason": dict(sorted(reasons.items())),
        "shards": len(shards),
        "resumed_shards": counts["resumed"],
        "retried_rows": counts["retried"],
        "duration_s": round(duration, 3),
        "samples_per_s": round(counts["new_samples"] / duration, 1) if duration > 0 else None,
        "output": str(out_dir),
        "config": asdict(config),
    }
    write_json(out_dir / SIZES_FILE, {s["shard"]: s["written"] for _, s in shards})
    write_json(out_dir / STATS_FILE, stats)
    return stats


def _commit_all(
    results: Iterable[tuple[int, ShardJob | None, ShardResult | None]], out_dir: Path, config: PrepConfig,
    retry_failed: bool, progress: Callable[[int], None] | None,
) -> tuple[list[tuple[int, dict[str, Any]]], Counter[str]]:
    """Commit the built shards in shard order: ``([(shard id, its stats)], counts)``, counting
    ``resumed`` shards, ``retried`` rows and ``new_samples``."""
    seen: set[bytes] | None = set() if config.dedup else None
    # --retry-failed --dedup: a refetched image is kept only if no shard holds it already
    known = written_digests(out_dir) if config.dedup and retry_failed else set()
    shards: list[tuple[int, dict[str, Any]]] = []
    counts: Counter[str] = Counter(resumed=0, retried=0, new_samples=0)
    for shard_id, job, result in results:
        if result is None:
            stats = read_shard_stats(out_dir, shard_id)
            counts["resumed"] += 1
        elif job is not None and job.only is not None:
            before = read_shard_stats(out_dir, shard_id)["written"]
            dropped = mark_duplicates(result.rows, known) if config.dedup else set()  # a refetch never replaces a sample
            merged = merge_retried(out_dir, result, dropped)
            # the old stats go first: a run killed before the new ones are written sees the shard
            # incomplete and builds it again
            (out_dir / f"{shard_name(shard_id)}_stats.json").unlink()
            stats = commit_shard(out_dir, merged, None)
            counts["retried"] += len(result.rows)
            counts["new_samples"] += stats["written"] - before
        else:
            stats = commit_shard(out_dir, result, seen)
            counts["new_samples"] += stats["written"]
            if config.dedup and retry_failed:
                known.update(dedup_key(r["sha256"]) for r in result.rows if r["status"] == SUCCESS)
        if seen is not None and (result is None or job.only is not None):
            rows = read_shard_rows(out_dir, shard_id, ("status", "sha256"))
            seen.update(dedup_key(h) for s, h in zip(rows["status"], rows["sha256"]) if s == SUCCESS)
        shards.append((shard_id, stats))
        if progress is not None:
            progress(stats["rows"])
    return shards, counts
