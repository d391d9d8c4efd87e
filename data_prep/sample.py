"""The per-record stage: one manifest record in, one shard sample (or a skip reason) out."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clipalign.formats.images import DEFAULT_MAX_PIXELS
from clipalign.formats.skips import CAPTION_TOO_LONG, EMPTY_CAPTION, PROCESSING_ERROR, UNDECODABLE_IMAGE
from data_prep.captions import caption_problem, normalize_caption
from data_prep.fetch import Downloader, FetchConfig, FetchError, fetch_url, read_local
from data_prep.images import IMAGE_FORMATS, RESIZE_MODES, WHITE, RejectedImage, UndecodableImage, process_image
from data_prep.records import Record


@dataclass(frozen=True)
class SampleConfig:
    """How one record becomes a sample.

    Attributes:
        image_size: Target side for resizing (see ``data_prep.images.resize_image``).
        resize_mode: ``center_crop``, ``keep_ratio``, ``border`` or ``no``.
        image_format: ``jpg``, ``webp`` or ``png``; also the image's extension in the shard.
        quality: Encoder quality for jpg/webp.
        background: RGB colour for transparency and ``border`` padding.
        max_pixels: Decompression-bomb guard: images with more pixels are skipped undecoded.
        min_image_size: Skip images whose smaller side is below this (original size).
        max_aspect_ratio: Skip images whose long/short side ratio is above this.
        max_caption_length: Skip captions longer than this many characters.
        tokenize: An open_clip model name: store the caption's token ids as ``tok.npy``.
        fetch: Download limits for URL records.
    """

    image_size: int = 256
    resize_mode: str = "center_crop"
    image_format: str = "jpg"
    quality: int = 95
    background: tuple[int, int, int] = WHITE
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    min_image_size: int = 0
    max_aspect_ratio: float | None = None
    max_caption_length: int | None = None
    tokenize: str | None = None
    fetch: FetchConfig = field(default_factory=FetchConfig)

    def __post_init__(self) -> None:
        """Check every option, so that a bad one fails here and not in a worker.

        Raises:
            ValueError: naming the option, its value and what it must be.
        """
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {self.image_format!r}")
        for name in ("image_size", "max_pixels"):
            if (value := getattr(self, name)) is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in 1..100, got {self.quality}")
        if len(self.background) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in self.background):
            raise ValueError(f"background must be 3 integers in 0..255 (R, G, B), got {self.background!r}")
        if self.min_image_size < 0:
            raise ValueError(f"min_image_size must be >= 0, got {self.min_image_size}")
        if self.max_aspect_ratio is not None and self.max_aspect_ratio < 1:
            raise ValueError(f"max_aspect_ratio must be >= 1, got {self.max_aspect_ratio}")
        fetch = self.fetch
        if fetch.timeout <= 0 or fetch.max_bytes <= 0 or fetch.retries < 0:
            raise ValueError(f"fetch timeout and max_bytes must be > 0 and retries >= 0, got {fetch.timeout}, "
                             f"{fetch.max_bytes} and {fetch.retries}")
        if self.tokenize is not None:
            from data_prep.tokens import context_length

            try:
                context_length(self.tokenize)
            except Exception as err:  # open_clip raises RuntimeError/ValueError/KeyError for unknown names
                raise ValueError(f"tokenize: no tokenizer for model {self.tokenize!r} ({err})") from None


@dataclass(frozen=True)
class Outcome:
    """What became of one record: a sample to write, or a reason it was skipped.

    ``meta`` is the sample's json (``None`` when skipped); ``sha256`` is the hex digest
    of the original image bytes, when they were read.
    """

    record: Record
    sample: dict[str, bytes | str] | None = None
    reason: str | None = None
    detail: str | None = None
    meta: dict[str, Any] | None = None
    sha256: str | None = None


def clean_captions(record: Record, max_length: int | None) -> tuple[list[str], tuple[str, str] | None]:
    """Normalised captions of ``record`` and the reason they are unusable (``None`` if usable)."""
    if record.captions is None:
        caption = None if record.caption is None else normalize_caption(record.caption)
        problem = caption_problem(caption, max_length)
        return ([caption] if caption else []), problem
    caps = [c for c in (normalize_caption(c) for c in record.captions) if c]
    if not caps:
        return [], (EMPTY_CAPTION, "all captions are empty")
    if max_length is not None:
        short = [c for c in caps if len(c) <= max_length]
        if not short:
            return [], (CAPTION_TOO_LONG, f"every caption is longer than {max_length} characters")
        caps = short
    return caps, None


def read_bytes(record: Record, fetch: FetchConfig, downloader: Downloader | None = None) -> bytes:
    """The record's original image bytes, from disk or the network (through ``downloader`` if given).

    Raises:
        FetchError: with the skip reason.
    """
    if record.url is not None:
        return downloader.fetch(record.url, fetch) if downloader is not None else fetch_url(record.url, fetch)
    return read_local(record.path, fetch.max_bytes)


@dataclass(frozen=True)
class Fetched:
    """A record whose captions are usable and whose image bytes are read: ready to encode."""

    record: Record
    captions: list[str]
    data: bytes


def fetch_record(record: Record, config: SampleConfig, downloader: Downloader | None = None) -> Fetched | Outcome:
    """The I/O stage: check the captions and read the image bytes (an ``Outcome`` if skipped)."""
    if record.error:
        return Outcome(record, reason=record.error, detail=record.detail)
    captions, problem = clean_captions(record, config.max_caption_length)
    if problem:
        return Outcome(record, reason=problem[0], detail=problem[1])
    try:
        data = read_bytes(record, config.fetch, downloader)
    except FetchError as err:
        return Outcome(record, reason=err.reason, detail=err.detail)
    return Fetched(record, captions, data)


def encode_record(fetched: Fetched, config: SampleConfig) -> Outcome:
    """The CPU stage: hash, decode, filter and re-encode the image; build the sample."""
    record, captions, data = fetched.record, fetched.captions, fetched.data
    digest = hashlib.sha256(data).hexdigest()
    try:
        img = process_image(
            data,
            size=config.image_size,
            resize_mode=config.resize_mode,  # type: ignore[arg-type]
            fmt=config.image_format,
            quality=config.quality,
            background=config.background,
            max_pixels=config.max_pixels,
            min_size=config.min_image_size,
            max_aspect_ratio=config.max_aspect_ratio,
        )
    except UndecodableImage as err:
        return Outcome(record, reason=UNDECODABLE_IMAGE, detail=str(err), sha256=digest)
    except RejectedImage as err:
        return Outcome(record, reason=err.reason, detail=err.detail, sha256=digest)
    meta: dict[str, Any] = {
        "key": record.key,
        "source": record.source,
        "caption": captions[0],
        **({"captions": captions} if record.captions is not None else {}),
        "width": img.width,
        "height": img.height,
        "original_width": img.original_width,
        "original_height": img.original_height,
        "sha256": digest,
    }
    sample: dict[str, bytes | str] = {"__key__": record.key, config.image_format: img.data, "txt": "\n".join(captions)}
    if config.tokenize:
        from data_prep.tokens import npy_bytes, token_ids

        # (L,) for one caption, (K, L) for K captions (--caption-mode all): the trainer draws one
        ids = np.stack([token_ids(c, config.tokenize) for c in captions]) if len(captions) > 1 else \
            token_ids(captions[0], config.tokenize)
        sample["tok.npy"] = npy_bytes(ids)
        meta.update(tokenizer=config.tokenize, context_length=int(ids.shape[-1]))
    for name, value in (record.extra or {}).items():
        meta.setdefault(name, value)  # our own fields win over a same-named column
    sample["json"] = json.dumps(meta, ensure_ascii=False, default=str)
    return Outcome(record, sample=sample, meta=meta, sha256=digest)


def process_record(record: Record, config: SampleConfig) -> Outcome:
    """Check captions, read, filter and encode one record (never raises for bad data)."""
    fetched = fetch_record(record, config)
    return fetched if isinstance(fetched, Outcome) else encode_record(fetched, config)


def safe_fetch_record(record: Record, config: SampleConfig, downloader: Downloader | None = None) -> Fetched | Outcome:
    """``fetch_record``, turning an unexpected exception into a counted ``processing_error``.

    One odd file must not stop a run over millions of rows.
    """
    try:
        return fetch_record(record, config, downloader)
    except Exception as err:  # noqa: BLE001
        return _processing_error(record, err)


def safe_encode_record(fetched: Fetched | Outcome, config: SampleConfig) -> Outcome:
    """``encode_record`` for a fetched record (a skip passes through), never raising."""
    if isinstance(fetched, Outcome):
        return fetched
    try:
        return encode_record(fetched, config)
    except Exception as err:  # noqa: BLE001
        return _processing_error(fetched.record, err)


def safe_process_record(record: Record, config: SampleConfig, downloader: Downloader | None = None) -> Outcome:
    """``process_record`` that never raises (see ``safe_fetch_record``)."""
    return safe_encode_record(safe_fetch_record(record, config, downloader), config)


def _processing_error(record: Record, err: Exception) -> Outcome:
    return Outcome(record, reason=PROCESSING_ERROR, detail=f"{type(err).__name__}: {err}")
