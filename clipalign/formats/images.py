"""Image files: the extensions the toolkit reads, the one folder walk, and the one decoder
for inference (training, evaluation, embedding, search and uploads all decode through here)."""
from __future__ import annotations

import io
import os
import stat
from pathlib import Path
from typing import BinaryIO, Callable

from PIL import Image

from clipalign.formats.skips import (IMAGE_TOO_LARGE, MISSING_IMAGE, NOT_A_FILE, UNDECODABLE_IMAGE, UNREADABLE_IMAGE,
                                     BadSample)

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb warning threshold: prep's limit, and uploads'
# Ordered: where a shard sample carries several image keys, the first one listed is read.
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# A stored (width, height) -> the least (width, height) a JPEG must still have once decoded, or None
# to decode it whole: the JPEG decoder then scales by 1/2, 1/4 or 1/8 as it decodes (PIL's
# ``Image.draft``), 1.5-2x cheaper than decoding whole and shrinking after (BENCHMARKS.md).
Draft = Callable[[tuple[int, int]], "tuple[int, int] | None"]


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and is_regular_file(path)


def is_regular_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` (its link target, if a link) is a regular file: not a directory, FIFO,
    socket or device, any of which can hang a reader or never end."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def image_files(root: str | os.PathLike, *, regular_only: bool = True) -> list[Path]:
    """The image files under ``root``, recursively, sorted by their path relative to ``root``;
    with ``regular_only=False`` also what is named like one but is not a regular file (a folder,
    FIFO or device), for a reader that counts it as skipped instead of leaving it out unsaid."""
    root = Path(root)
    wanted = is_image_file if regular_only else (lambda p: p.suffix.lower() in IMAGE_EXTENSIONS)
    return sorted((p for p in root.rglob("*") if wanted(p)), key=lambda p: p.relative_to(root).as_posix())


def open_regular_file(path: str | os.PathLike) -> BinaryIO:
    """``path`` opened for reading in binary, once it is known to be a regular file.

    The type is checked before opening (opening a device can act on it) and again on the
    opened file, which is opened non-blocking so that a FIFO swapped in between cannot hang.

    Raises:
        BadSample: ``missing_image``, ``not_a_file`` or ``unreadable_image``.
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise BadSample(NOT_A_FILE, f"{path} is not a regular file")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise BadSample(MISSING_IMAGE, str(path)) from None
    except OSError as exn:
        raise BadSample(UNREADABLE_IMAGE, f"{path}: {exn.strerror or exn}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BadSample(NOT_A_FILE, f"{path} is not a regular file")
    return os.fdopen(fd, "rb")


def _decode(fp: BinaryIO, what: str, max_pixels: int | None, draft: Draft | None = None) -> Image.Image:
    try:
        with Image.open(fp) as img:  # reads the header only
            if max_pixels is not None and img.width * img.height > max_pixels:
                raise BadSample(IMAGE_TOO_LARGE, f"{what + ': ' if what else ''}{img.width}x{img.height} pixels, "
                                                 f"over the limit of {max_pixels}")
            if draft is not None and img.format == "JPEG" and (least := draft(img.size)) is not None:
                img.draft(img.mode, least)
            return img.convert("RGB")  # decodes
    except BadSample:
        raise
    except Image.DecompressionBombError as exn:  # PIL's own refusal, at twice its warning threshold
        raise BadSample(IMAGE_TOO_LARGE, f"{what}: {exn}" if what else str(exn)) from None
    except Exception as exn:
        raise BadSample(UNDECODABLE_IMAGE, f"{what}: {exn}" if what else str(exn)) from exn


def decode_image(data: bytes, what: str = "", max_pixels: int | None = None, draft: Draft | None = None
                 ) -> Image.Image:
    """Encoded image bytes → an RGB image.

    Args:
        what: names the image in error messages.
        max_pixels: refuse an image with more pixels than this, from its header, before
            decoding it (``None``: PIL's own bomb check only).
        draft: how small a JPEG may be decoded (see ``Draft``); ``None``: at full size.

    Raises:
        BadSample: ``image_too_large``, or ``undecodable_image`` (PIL raises many exception
            types for bad bytes).
    """
    return _decode(io.BytesIO(data), what, max_pixels, draft)


def read_image(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               draft: Draft | None = None) -> Image.Image:
    """An image file → RGB, read from the file as it decodes (never whole into memory first).

    ``draft``: how small a JPEG may be decoded (see ``Draft``); ``None``: at full size.

    Raises:
        BadSample: ``missing_image``, ``not_a_file``, ``unreadable_image``, ``image_too_large``
            or ``undecodable_image``.
    """
    with open_regular_file(path) as f:
        return _decode(f, str(path), max_pixels, draft)
