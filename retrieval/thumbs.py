"""Thumbnails of indexed images, read back from the index's own data by row, never by a given path."""
from __future__ import annotations

import io
from typing import Any

from retrieval.sources import read_image_bytes


def thumbnail(row: dict[str, Any], size: int = 192) -> bytes:
    """A JPEG of at most ``size`` pixels a side of the image a metadata row describes.

    Raises:
        OSError, ValueError: the stored image is gone or unreadable.
    """
    from PIL import Image

    with Image.open(io.BytesIO(read_image_bytes(row))) as img:
        img = img.convert("RGB")
        img.thumbnail((size, size))
        if max(img.size) < size // 2:  # tiny images (the toy corpus) are scaled up for legibility
            scale = size // max(img.size)
            img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
        out = io.BytesIO()
        img.save(out, "JPEG", quality=85)
        return out.getvalue()
