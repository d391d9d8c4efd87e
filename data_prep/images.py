"""Decode, convert, resize and encode images. Pure functions: bytes or images in, new ones out."""
from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

ResizeMode = Literal["center_crop", "keep_ratio", "border", "no"]
RESIZE_MODES: tuple[str, ...] = ("center_crop", "keep_ratio", "border", "no")
IMAGE_FORMATS: tuple[str, ...] = ("jpg", "webp", "png")
WHITE = (255, 255, 255)

_PIL_FORMAT = {"jpg": "JPEG", "webp": "WEBP", "png": "PNG"}


class UndecodableImage(ValueError):
    """The bytes could not be decoded as an image."""


@dataclass(frozen=True)
class EncodedImage:
    """An encoded image with the sizes before and after resizing."""

    data: bytes
    width: int
    height: int
    original_width: int
    original_height: int


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes fully, applying the EXIF orientation.

    Raises:
        UndecodableImage: if PIL cannot read the bytes (corrupt, truncated, not an image).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. DecompressionBombWarning, palette warnings
            img = Image.open(io.BytesIO(data))
            img.load()
            return ImageOps.exif_transpose(img)
    except Exception as err:  # PIL's decoders raise many types on bad input
        # Drop object reprs ("<_io.BytesIO object at 0x...>") so messages are reproducible.
        message = re.sub(r"\s*<[^<>]* at 0x[0-9a-f]+>", "", str(err))
        raise UndecodableImage(f"{type(err).__name__}: {message}") from err


def to_rgb(img: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Convert any PIL mode to RGB; transparency is composited onto ``background``.

    Plain ``convert("RGB")`` would drop alpha and show transparent pixels as whatever
    colour they hold (often black), so alpha is composited explicitly.
    """
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit greyscale: scale to 8 bits instead of clipping everything above 255.
        arr = np.asarray(img, dtype=np.float64) / 257.0
        img = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), "L")
    elif img.mode == "L" and "transparency" in img.info:
        img = img.convert("LA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, F, ...


def resize_image(
    img: Image.Image,
    size: int,
    mode: ResizeMode = "center_crop",
    background: tuple[int, int, int] = WHITE,
) -> Image.Image:
    """Resize with img2dataset's semantics.

    * ``center_crop``: smaller side to ``size``, then a centred ``size x size`` crop.
    * ``keep_ratio``: smaller side to ``size``, aspect ratio kept.
    * ``border``: larger side to ``size``, then padded to a square with ``background``.
    * ``no``: unchanged.
    """
    if mode == "no":
        return img
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; choose from {RESIZE_MODES}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    w, h = img.size
    side = min(w, h) if mode in ("center_crop", "keep_ratio") else max(w, h)
    scale = size / side
    new_w = size if side == w else max(1, round(w * scale))
    new_h = size if side == h else max(1, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.LANCZOS)
    if mode == "center_crop":
        left, top = (new_w - size) // 2, (new_h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    elif mode == "border":
        canvas = Image.new(img.mode, (size, size), background)
        canvas.paste(img, ((size - new_w) // 2, (size - new_h) // 2))
        img = canvas
    return img


def encode_image(img: Image.Image, fmt: str = "jpg", quality: int = 95) -> bytes:
    """Encode an RGB image as ``jpg``, ``webp`` or ``png`` bytes (deterministic)."""
    if fmt not in _PIL_FORMAT:
        raise ValueError(f"unknown image format {fmt!r}; choose from {IMAGE_FORMATS}")
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG")
    else:
        img.save(buf, format=_PIL_FORMAT[fmt], quality=quality)
    return buf.getvalue()


def process_image(
    data: bytes,
    *,
    size: int = 256,
    resize_mode: ResizeMode = "center_crop",
    fmt: str = "jpg",
    quality: int = 95,
) -> EncodedImage:
    """Decode -> RGB -> resize -> encode, keeping the original size.

    Raises:
        UndecodableImage: if ``data`` is not a readable image.
    """
    img = decode_image(data)
    original_width, original_height = img.size
    img = resize_image(to_rgb(img), size, resize_mode)
    return EncodedImage(encode_image(img, fmt, quality), img.width, img.height, original_width, original_height)
