"""Image files: the extensions the toolkit reads, the one folder walk, and the one decoder
for inference (training, evaluation, embedding, search and uploads all decode through here)."""
from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image

from clipalign.formats.skips import MISSING_IMAGE, UNDECODABLE_IMAGE, BadSample

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb warning threshold: prep's limit, and uploads'
# Ordered: where a shard sample carries several image keys, the first one listed is read.
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def image_files(root: str | os.PathLike) -> list[Path]:
    """The image files under ``root``, recursively, sorted by their path relative to ``root``."""
    root = Path(root)
    return sorted((p for p in root.rglob("*") if is_image_file(p)), key=lambda p: p.relative_to(root).as_posix())


def decode_image(data: bytes, what: str = "") -> Image.Image:
    """Encoded image bytes → an RGB image.

    Raises:
        BadSample: ``undecodable_image`` (PIL raises many exception types for bad bytes).
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")
    except Exception as exn:
        raise BadSample(UNDECODABLE_IMAGE, f"{what}: {exn}" if what else str(exn)) from exn


def read_image(path: str | os.PathLike) -> Image.Image:
    """An image file → RGB; ``BadSample`` (``missing_image`` or ``undecodable_image``) otherwise."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise BadSample(MISSING_IMAGE, str(path)) from None
    return decode_image(data, str(path))
