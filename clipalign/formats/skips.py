"""Why a row, an image or a sample was skipped: the reasons every stage reports, and their counter.

A bad input never stops a run: it is skipped, counted under one of these short, stable
reasons (they appear in ``stats.json``, ``errors.jsonl``, embeddings and eval reports) and
the run goes on.
"""
from __future__ import annotations

import logging
import tarfile
from collections import Counter

from PIL import UnidentifiedImageError

log = logging.getLogger(__name__)

# The input row itself.
BAD_ROW = "bad_row"
# Captions.
MISSING_CAPTION = "missing_caption"
EMPTY_CAPTION = "empty_caption"
CAPTION_TOO_LONG = "caption_too_long"
# Images: reading and decoding.
MISSING_IMAGE = "missing_image"
NOT_A_FILE = "not_a_file"  # a directory, FIFO or device where an image file should be
UNREADABLE_IMAGE = "unreadable_image"
UNDECODABLE_IMAGE = "undecodable_image"
PROCESSING_ERROR = "processing_error"
# Images: prep's filters.
IMAGE_TOO_LARGE = "image_too_large"
IMAGE_TOO_SMALL = "image_too_small"
BAD_ASPECT_RATIO = "bad_aspect_ratio"
DUPLICATE = "duplicate"
# Downloads.
NOT_FOUND = "http_not_found"
HTTP_ERROR = "http_error"
TIMEOUT = "timeout"
CONNECTION_ERROR = "connection_error"
TRUNCATED = "truncated_download"
TOO_LARGE = "too_large"
NOT_AN_IMAGE = "not_an_image"
ROBOTS_NOAI = "robots_noai"
# Shards.
MISSING_SHARD = "missing_shard"
TRUNCATED_SHARD = "truncated_shard"


class BadSample(ValueError):
    """A sample that cannot be used, with one of the reasons above."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def skip_reason(exn: BaseException) -> str:
    """The reason for an exception met while reading a sample."""
    if isinstance(exn, BadSample):
        return exn.reason
    if isinstance(exn, FileNotFoundError):
        return MISSING_SHARD
    if isinstance(exn, (tarfile.ReadError, tarfile.HeaderError, EOFError)):
        return TRUNCATED_SHARD
    if isinstance(exn, (UnidentifiedImageError, OSError, SyntaxError)):
        return UNDECODABLE_IMAGE
    return type(exn).__name__


class SkipCounter:
    """Count skipped samples by reason; also a webdataset exception handler (skip, count, go on)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.active = True  # off while a resumed stream replays what was counted before

    def __call__(self, exn: BaseException) -> bool:
        reason = skip_reason(exn)
        if self.active:
            self.counts[reason] += 1
        log.warning("skipped a sample (%s): %s", reason, exn)
        return True

    def add(self, reason: str, n: int = 1) -> None:
        """Count ``n`` skips known by reason only (no exception to show)."""
        if n:
            self.counts[reason] += n


def merge_counts(*counts: dict[str, int]) -> dict[str, int]:
    """The sum of several ``{reason: n}`` counts."""
    total: Counter[str] = Counter()
    for c in counts:
        total.update(c)
    return dict(total)
