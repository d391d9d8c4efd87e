"""Thumbnails of indexed images, read back from the index's own data by row, never by a given path."""
from __future__ import annotations

import io
from typing import Any

from clipalign.formats.images import DEFAULT_MAX_PIXELS, decode_image
from retrieval.sources import read_image_bytes


def thumbnail(row: dict[str, Any], size: int = 192, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> bytes:
    """A JPEG of at most ``size`` pixels a side of the image a metadata row describes.

    Raises:
        OSError, ValueError: the stored image is gone, not a regular file, unreadable, or
            over ``max_pixels``.
    """
    from PIL import Image

    img = decode_image(read_image_bytes(row), f"row {row.get('key', '')}", max_pixels=max_pixels)
    img.thumbnail((size, size))
    if max(img.size) < size // 2:  # tiny images (the toy corpus) are scaled up for legibility
        scale = size // max(img.size)
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=85)
    return out.getvalue()
