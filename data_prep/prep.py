"""Compose reader -> shard jobs -> commit: image-caption records into WebDataset shards.

``run_prep`` is the whole pipeline. Rows are cut into shards of ``shard_size``
consecutive rows (shard ``i`` = rows ``[i * S, (i + 1) * S)``; skipped rows leave a
shard with fewer samples), each built by a worker process (see ``data_prep.shard_job``)
and committed in order, so the output is byte-identical for any number of workers.

Outputs in ``out_dir``: per shard ``NNNNN.tar``, ``NNNNN.parquet`` (one row per input
row, with its status) and ``NNNNN_stats.json``; for the run ``stats.json``,
``sizes.json`` (shard -> samples), ``errors.jsonl`` (one line per skipped row) and
``prep_config.json`` (the options, checked when a run resumes).

Re-running into the same folder resumes: complete shards are kept, the rest redone.
"""
from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from clipalign.formats.atomic import write_json
from data_prep.memory import keep_freed_memory
from data_prep.records import Record
from data_prep.sample import SampleConfig
from data_prep.shard_job import (
    SHARD_FILE,
    SUCCESS,
    ShardResult,
    build_shard,
    commit_shard,
    dedup_key,
    encode_threads,
    read_shard_rows,
    read_shard_stats,
    shard_is_complete,
)

CONFIG_FILE = "prep_config.json"
STATS_FILE, SIZES_FILE, ERRORS_FILE = "stats.json", "sizes.json", "errors.jsonl"
RUN_FILES = (STATS_FILE, SIZES_FILE, ERRORS_FILE, CONFIG_FILE)
TMP_PATTERNS = ("*.tmp", "*.tmp.dedup")  # every temporary name of a run ends so


class ResumeMismatch(ValueError):
    """``out_dir`` holds shards made with other options or from another input."""


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


def plan_shards(records: Iterable[Record], shard_size: int) -> Iterator[tuple[int, list[Record]]]:
    """``(shard id, its rows)``: consecutive runs of ``shard_size`` records, streamed."""
    it = iter(records)
    for shard_id in itertools.count():
        rows = list(itertools.islice(it, shard_size))
        if not rows:
            return
        yield shard_id, rows


def _built_shards(
    plan: Iterable[tuple[int, list[Record]]], out_dir: Path, config: PrepConfig
) -> Iterator[tuple[int, ShardResult | None]]:
    """``(shard id, result)`` in shard order; ``None`` for shards complete from an earlier run.

    With several workers at most ``2 * workers`` shards are in flight, so memory stays
    flat whatever the input's length.
    """
    args = (str(out_dir), config.sample, config.threads, encode_threads(config.workers))
    if config.workers == 1:
        for shard_id, rows in plan:
            yield shard_id, None if shard_is_complete(out_dir, shard_id) else build_shard(shard_id, rows, *args)
        return
    import torch  # noqa: F401  (for the resizes: imported once here, shared by the forked workers)

    with multiprocessing.Pool(config.workers, initializer=keep_freed_memory) as pool:
        pending: deque = deque()
        for shard_id, rows in plan:
            job = None if shard_is_complete(out_dir, shard_id) else pool.apply_async(build_shard, (shard_id, rows, *args))
            pending.append((shard_id, job))
            while len(pending) >= 2 * config.workers:
                done_id, done = pending.popleft()
                yield done_id, done.get() if done is not None else None
        while pending:
            done_id, done = pending.popleft()
            yield done_id, done.get() if done is not None else None


def _check_resume(out_dir: Path, options: dict[str, Any]) -> None:
    path = out_dir / CONFIG_FILE
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old != options:
            changed = sorted(k for k in set(old) | set(options) if old.get(k) != options.get(k))
            raise ResumeMismatch(f"{out_dir} holds shards made with other options ({', '.join(changed)} differ)")
    elif any(out_dir.glob("[0-9][0-9][0-9][0-9][0-9].tar")):
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
    tmp = out_dir / f"{ERRORS_FILE}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for shard_id, stats in shards:
            if not stats["skipped"]:
                continue
            rows = read_shard_rows(out_dir, shard_id, columns)
            for index, key, source, status, reason, detail in zip(*(rows[c] for c in columns)):
                if status != SUCCESS:
                    entry = {"index": index, "key": key, "source": source, "reason": reason, "detail": detail}
                    f.write(json.dumps(entry, ensure_ascii=False) + "\n")
    os.replace(tmp, out_dir / ERRORS_FILE)


def run_prep(
    records: Iterable[Record],
    out_dir: str | os.PathLike,
    config: PrepConfig = PrepConfig(),
    *,
    source: str | None = None,
    progress: Callable[[int], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Any]:
    """Write ``records`` as WebDataset shards plus per-shard and run-level metadata.

    Args:
        records: Input rows, e.g. from ``data_prep.manifest.open_records``.
        out_dir: Output folder (created if missing). If it holds a run of the same
            options and ``source``, that run is resumed.
        config: Processing and sharding options.
        source: The input's name, recorded so a resume from another input is refused.
        progress: Called with the number of rows after each shard (e.g. ``tqdm.update``).
        clock: Time source for ``duration_s``.

    Returns:
        The stats dict also saved as ``stats.json``.

    Raises:
        ResumeMismatch: if ``out_dir`` holds shards of other options or another input.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_resume(out_dir, {**config.output_options(), "source": source})
    _remove_tmp_files(out_dir)
    start = clock()
    seen: set[bytes] | None = set() if config.dedup else None
    shards: list[tuple[int, dict[str, Any]]] = []
    resumed = new_samples = 0
    for shard_id, result in _built_shards(plan_shards(records, config.shard_size), out_dir, config):
        if result is None:
            stats = read_shard_stats(out_dir, shard_id)
            resumed += 1
            if seen is not None:
                rows = read_shard_rows(out_dir, shard_id, ("status", "sha256"))
                seen.update(dedup_key(h) for s, h in zip(rows["status"], rows["sha256"]) if s == SUCCESS)
        else:
            stats = commit_shard(out_dir, result, seen)
            new_samples += stats["written"]
        shards.append((shard_id, stats))
        if progress is not None:
            progress(stats["rows"])
    _write_errors(out_dir, shards)
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
        "resumed_shards": resumed,
        "duration_s": round(duration, 3),
        "samples_per_s": round(new_samples / duration, 1) if duration > 0 else None,
        "output": str(out_dir),
        "config": asdict(config),
    }
    write_json(out_dir / SIZES_FILE, {s["shard"]: s["written"] for _, s in shards})
    write_json(out_dir / STATS_FILE, stats)
    return stats
