"""Streaming training data: WebDataset shards → batches of (images, token ids).

Bad samples never stop a run: an undecodable image, an empty caption or a truncated shard
is skipped, counted by reason in the worker that met it, and the counts travel to the
trainer with every batch.
"""
from __future__ import annotations

import glob
import io
import logging
import os
import random
import tarfile
from collections import Counter
from typing import Callable, Iterable, Iterator

import torch
import webdataset as wds
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


class BadSample(ValueError):
    """A sample that cannot be used, with a short stable reason (``empty_caption``, ...)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def skip_reason(exn: BaseException) -> str:
    """Map an exception met while reading a sample to a short reason string."""
    if isinstance(exn, BadSample):
        return exn.reason
    if isinstance(exn, FileNotFoundError):
        return "missing_shard"
    if isinstance(exn, (tarfile.ReadError, tarfile.HeaderError, EOFError)):
        return "truncated_shard"
    if isinstance(exn, (UnidentifiedImageError, OSError, SyntaxError)):
        return "undecodable_image"
    return type(exn).__name__


class SkipCounter:
    """A webdataset exception handler: skip the sample, count it by reason, go on."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def __call__(self, exn: BaseException) -> bool:
        reason = skip_reason(exn)
        self.counts[reason] += 1
        log.warning("skipped a sample (%s): %s", reason, exn)
        return True


def resolve_shards(spec: str | os.PathLike | Iterable[str]) -> list[str]:
    """Shard paths from a folder (its ``*.tar``), a glob, a brace pattern or a list.

    Local paths that do not exist are dropped, so a wrong path yields an empty list rather
    than a stream that retries a missing file forever; URLs (``scheme://``) pass through.
    """
    if isinstance(spec, (str, os.PathLike)):
        spec = str(spec)
        if os.path.isdir(spec):
            paths = sorted(glob.glob(os.path.join(spec, "*.tar")))
        elif any(ch in spec for ch in "*?["):
            paths = sorted(glob.glob(spec))
        else:
            paths = wds.shardlists.expand_urls(spec)
    else:
        paths = [str(s) for s in spec]
    return [p for p in paths if "://" in p or p.startswith("pipe:") or os.path.isfile(p)]


def decode_image(sample: dict) -> Image.Image:
    """The sample's image as RGB; raises ``BadSample`` if it has none or it is undecodable."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise BadSample("missing_image", sample.get("__key__", ""))
    try:
        with Image.open(io.BytesIO(sample[key])) as img:
            return img.convert("RGB")
    except Exception as exn:  # PIL raises many types for bad bytes
        raise BadSample("undecodable_image", f"{sample.get('__key__', '')}: {exn}") from exn


def decode_caption(sample: dict) -> str:
    """The sample's caption, stripped; raises ``BadSample`` if it is missing or empty."""
    if "txt" not in sample:
        raise BadSample("missing_caption", sample.get("__key__", ""))
    caption = sample["txt"].decode("utf-8", errors="replace").strip()
    if not caption:
        raise BadSample("empty_caption", sample.get("__key__", ""))
    return caption


class SampleDecoder:
    """Raw tar sample → (image tensor, token ids); raises ``BadSample`` on bad input.

    Args:
        transform: PIL image → (3, H, W) tensor (open_clip's train or eval transform).
        tokenizer: open_clip tokenizer, ``list[str] → (1, L)``.
    """

    def __init__(self, transform: Callable, tokenizer: Callable):
        self.transform = transform
        self.tokenizer = tokenizer

    def __call__(self, sample: dict) -> tuple[torch.Tensor, torch.Tensor]:
        caption = decode_caption(sample)
        return self.transform(decode_image(sample)), self.tokenizer([caption])[0]


class DataStreamError(RuntimeError):
    """The shards yield no usable sample at all."""


class ProgressGuard:
    """Stops an endless resampled stream that never yields a usable sample.

    ``ResampledShards`` repeats forever, so shards that are all empty, or samples that are
    all bad, would make the loader wait forever. The guard raises ``DataStreamError`` after
    ``max_barren_shards`` shards in a row without a sample, or ``max_skips`` skipped samples
    in a row without a good one.
    """

    def __init__(self, counter: SkipCounter, max_barren_shards: int, max_skips: int):
        self.counter = counter
        self.max_barren_shards, self.max_skips = max_barren_shards, max_skips
        self.barren_shards = 0
        self.skips_in_a_row = 0

    def _fail(self, what: str) -> None:
        raise DataStreamError(f"{what}; skipped so far: {dict(self.counter.counts)}")

    def shards(self, urls: Iterable[dict]) -> Iterator[dict]:
        for url in urls:
            self.barren_shards += 1
            if self.barren_shards > self.max_barren_shards:
                self._fail(f"the last {self.max_barren_shards} shards read held no sample")
            yield url

    def raw(self, samples: Iterable[dict]) -> Iterator[dict]:
        for sample in samples:
            self.barren_shards = 0
            yield sample

    def skipped(self, exn: BaseException) -> bool:
        """The stream's exception handler: count, then give up after too many in a row."""
        self.counter(exn)
        self.skips_in_a_row += 1
        if self.skips_in_a_row > self.max_skips:
            self._fail(f"{self.max_skips} samples in a row were unusable")
        return True

    def good(self, samples: Iterable) -> Iterator:
        for sample in samples:
            self.skips_in_a_row = 0
            yield sample


def _attach_skip_counts(batches: Iterator, counter: SkipCounter) -> Iterator:
    worker = torch.utils.data.get_worker_info()
    worker_id = worker.id if worker is not None else 0
    for images, texts in batches:
        yield images, texts, {"worker": worker_id, "skipped": dict(counter.counts)}


def train_pipeline(
    shards: list[str],
    *,
    transform: Callable,
    tokenizer: Callable,
    batch_size: int,
    seed: int = 0,
    shuffle_buffer: int = 2000,
) -> wds.DataPipeline:
    """An endless stream of ``(images (B,3,H,W), texts (B,L), skip_info)`` batches.

    Shards are drawn at random with replacement (each worker its own seeded stream, as
    open_clip's ``--dataset-resampled``), samples are mixed in a seeded shuffle buffer, and bad
    samples are skipped and counted (``skip_info["skipped"]``: reason → count, cumulative
    for the worker ``skip_info["worker"]``). A stream that yields no usable sample from
    many shards in a row raises ``DataStreamError`` instead of waiting forever.
    """
    counter = SkipCounter()
    guard = ProgressGuard(counter, max_barren_shards=max(20, 2 * len(shards)), max_skips=max(1000, 2 * shuffle_buffer))
    return wds.DataPipeline(
        wds.ResampledShards(shards, seed=seed, deterministic=True),
        guard.shards,
        wds.tarfile_to_samples(handler=guard.skipped),
        guard.raw,
        _seeded_shuffle(shuffle_buffer, seed),
        wds.map(SampleDecoder(transform, tokenizer), handler=guard.skipped),
        guard.good,
        wds.batched(batch_size, partial=False),
        lambda batches: _attach_skip_counts(batches, counter),
    )


def _seeded_shuffle(bufsize: int, seed: int) -> Callable[[Iterable], Iterator]:
    """webdataset's shuffle buffer with an RNG seeded from (seed, loader worker id), made
    inside the worker, so every worker shuffles differently yet reproducibly."""

    def stage(samples: Iterable) -> Iterator:
        worker = torch.utils.data.get_worker_info()
        rng = random.Random(seed * 1009 + (worker.id if worker is not None else 0))
        return wds.shuffle(bufsize, initial=min(bufsize, 500), rng=rng)(samples)

    return stage


def train_loader(pipeline: wds.DataPipeline, workers: int) -> wds.WebLoader:
    """A DataLoader over the pipeline's ready-made batches."""
    return wds.WebLoader(
        pipeline,
        batch_size=None,
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )


def merge_skip_counts(per_worker: dict[int, dict[str, int]]) -> dict[str, int]:
    """Sum the latest cumulative counts of every worker."""
    total: Counter[str] = Counter()
    for counts in per_worker.values():
        total.update(counts)
    return dict(total)
