"""Compose reader -> process -> writer: image-caption records into WebDataset shards.

``run_prep`` is the whole pipeline; ``process_record`` is the per-sample stage that
worker processes run. Outputs in ``out_dir``: ``00000.tar, 00001.tar, ...``,
``stats.json``, ``sizes.json`` and ``errors.jsonl`` (one line per skipped sample).
"""
from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from clipalign.atomic import write_json
from data_prep.images import IMAGE_FORMATS, RESIZE_MODES, UndecodableImage, process_image
from data_prep.manifest import Record
from data_prep.shards import ShardSink

SHARD_PATTERN = "%05d.tar"

# Stable skip reasons (they appear in stats.json and errors.jsonl).
MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
UNDECODABLE_IMAGE = "undecodable_image"
EMPTY_CAPTION = "empty_caption"
MISSING_CAPTION = "missing_caption"
BAD_ROW = "bad_row"


@dataclass(frozen=True)
class PrepConfig:
    """How samples are processed and sharded.

    Attributes:
        image_size: Target side for resizing (see ``data_prep.images.resize_image``).
        resize_mode: ``center_crop``, ``keep_ratio``, ``border`` or ``no``.
        image_format: ``jpg``, ``webp`` or ``png``; also the image's extension in the shard.
        quality: Encoder quality for jpg/webp.
        shard_size: Samples per shard at most.
        workers: Processes decoding images; output is identical for any value.
        chunk_size: Records handed to a worker at a time.
    """

    image_size: int = 256
    resize_mode: str = "center_crop"
    image_format: str = "jpg"
    quality: int = 95
    shard_size: int = 10_000
    workers: int = 1
    chunk_size: int = 64

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {self.image_format!r}")
        for name in ("image_size", "shard_size", "workers", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class Outcome:
    """What became of one record: a sample to write, or a reason it was skipped."""

    record: Record
    sample: dict[str, bytes | str] | None = None
    reason: str | None = None
    detail: str | None = None


def process_record(record: Record, config: PrepConfig) -> Outcome:
    """Read, check and encode one record into a shard sample (never raises for bad data)."""
    if record.error:
        return Outcome(record, reason=record.error, detail=record.detail)
    if record.caption is None:
        return Outcome(record, reason=MISSING_CAPTION, detail="no caption")
    if not record.caption:
        return Outcome(record, reason=EMPTY_CAPTION, detail="caption is empty")
    if record.path is None or not record.path.is_file():
        return Outcome(record, reason=MISSING_IMAGE, detail=f"no such file: {record.path}")
    try:
        data = record.path.read_bytes()
    except OSError as err:
        return Outcome(record, reason=UNREADABLE_IMAGE, detail=f"{type(err).__name__}: {err}")
    try:
        img = process_image(
            data,
            size=config.image_size,
            resize_mode=config.resize_mode,  # type: ignore[arg-type]
            fmt=config.image_format,
            quality=config.quality,
        )
    except UndecodableImage as err:
        return Outcome(record, reason=UNDECODABLE_IMAGE, detail=str(err))
    meta = {
        "key": record.key,
        "source": record.source,
        "caption": record.caption,
        "width": img.width,
        "height": img.height,
        "original_width": img.original_width,
        "original_height": img.original_height,
    }
    sample: dict[str, bytes | str] = {
        "__key__": record.key,
        config.image_format: img.data,
        "txt": record.caption,
        "json": json.dumps(meta, ensure_ascii=False),
    }
    return Outcome(record, sample=sample)


def _process_chunk(chunk: list[Record], config: PrepConfig) -> list[Outcome]:
    return [process_record(r, config) for r in chunk]


def _chunks(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    it = iter(records)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def process_records(records: Iterable[Record], config: PrepConfig) -> Iterator[Outcome]:
    """Process records in input order, in ``config.workers`` processes.

    With several workers, chunks go to a process pool with a bounded number in
    flight and come back in submission order, so memory stays flat on long inputs
    and the output does not depend on the number of workers.
    """
    fn = partial(_process_chunk, config=config)
    chunks = _chunks(records, config.chunk_size)
    if config.workers == 1:
        for chunk in chunks:
            yield from fn(chunk)
        return
    with multiprocessing.Pool(config.workers) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(fn, (chunk,)))
            if len(pending) >= 2 * config.workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


def _error_line(outcome: Outcome) -> str:
    r = outcome.record
    entry = {"index": r.index, "key": r.key, "source": r.source, "reason": outcome.reason, "detail": outcome.detail}
    return json.dumps(entry, ensure_ascii=False) + "\n"


def run_prep(
    records: Iterable[Record],
    out_dir: str | os.PathLike,
    config: PrepConfig = PrepConfig(),
    *,
    progress: Callable[[int], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Any]:
    """Write ``records`` as WebDataset shards plus ``stats.json``, ``sizes.json``, ``errors.jsonl``.

    Args:
        records: Input rows, e.g. from ``data_prep.manifest.open_records``.
        out_dir: Output folder (created if missing).
        config: Processing and sharding options.
        progress: Called with ``1`` after each record (e.g. ``tqdm.update``).
        clock: Time source for ``duration_s``.

    Returns:
        The stats dict also saved as ``stats.json``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = clock()
    seen = written = 0
    reasons: Counter[str] = Counter()
    with ShardSink(out_dir, pattern=SHARD_PATTERN, maxcount=config.shard_size) as sink, open(
        out_dir / "errors.jsonl", "w", encoding="utf-8"
    ) as errors:
        for outcome in process_records(records, config):
            seen += 1
            if outcome.sample is not None:
                sink.write(outcome.sample)
                written += 1
            else:
                reasons[outcome.reason or "unknown"] += 1
                errors.write(_error_line(outcome))
            if progress is not None:
                progress(1)
    sizes = sink.close()
    duration = clock() - start
    stats = {
        "seen": seen,
        "written": written,
        "skipped": seen - written,
        "skipped_by_reason": dict(sorted(reasons.items())),
        "shards": len(sizes),
        "duration_s": round(duration, 3),
        "samples_per_s": round(written / duration, 1) if duration > 0 else None,
        "output": str(out_dir),
        "config": asdict(config),
    }
    write_json(out_dir / "sizes.json", sizes)
    write_json(out_dir / "stats.json", stats)
    return stats
