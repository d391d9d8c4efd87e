"""Decode, convert, resize and encode images. Pure functions: bytes or images in, new ones out."""
from __future__ import annotations

import contextlib
import io
import math
import re
import warnings
from dataclasses import dataclass
from typing import Iterator, Literal

import numpy as np
from PIL import Image, ImageOps

from clipalign.formats.skips import BAD_ASPECT_RATIO, IMAGE_TOO_LARGE, IMAGE_TOO_SMALL
from data_prep.resample import resample

ResizeMode = Literal["center_crop", "keep_ratio", "border", "no"]
RESIZE_MODES: tuple[str, ...] = ("center_crop", "keep_ratio", "border", "no")
IMAGE_FORMATS: tuple[str, ...] = ("jpg", "webp", "png")
WHITE = (255, 255, 255)


_PIL_FORMAT = {"jpg": "JPEG", "webp": "WEBP", "png": "PNG"}


class UndecodableImage(ValueError):
    """The bytes could not be decoded as an image."""


class RejectedImage(ValueError):
    """The image decodes but a filter refuses it; ``reason`` is a stable skip reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class EncodedImage:
    """An encoded image with the sizes before and after resizing."""

    data: bytes
    width: int
    height: int
    original_width: int
    original_height: int


@contextlib.contextmanager
def _decoding() -> Iterator[None]:
    """Turn PIL's many failure types into ``UndecodableImage`` or ``RejectedImage``; mute its warnings."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. DecompressionBombWarning, palette warnings
            yield
    except RejectedImage:
        raise
    except Image.DecompressionBombError as err:
        raise RejectedImage(IMAGE_TOO_LARGE, str(err)) from err
    except Exception as err:  # PIL's decoders raise many types on bad input
        # Drop object reprs ("<_io.BytesIO object at 0x...>") so messages are reproducible.
        message = re.sub(r"\s*<[^<>]* at 0x[0-9a-f]+>", "", str(err))
        raise UndecodableImage(f"{type(err).__name__}: {message}") from err


def open_image(data: bytes, *, max_pixels: int | None = None) -> Image.Image:
    """Read an image's header (not its pixels yet).

    Args:
        data: Encoded image bytes.
        max_pixels: Refuse images with more pixels than this before decoding them
            (a decompression-bomb guard); PIL's own limit applies too.

    Raises:
        UndecodableImage: if PIL cannot read the header (not an image, corrupt).
        RejectedImage: ``image_too_large`` if the image has more than ``max_pixels`` pixels.
    """
    with _decoding():
        img = Image.open(io.BytesIO(data))
        if max_pixels is not None and img.width * img.height > max_pixels:
            raise RejectedImage(IMAGE_TOO_LARGE, f"{img.width}x{img.height} pixels > {max_pixels}")
        return img


def load_image(img: Image.Image, *, draft: tuple[int, int] | None = None) -> Image.Image:
    """Decode an opened image fully (the first frame of animations), applying the EXIF orientation.

    Args:
        img: From ``open_image``.
        draft: For JPEGs, let the decoder scale down by 1/2, 1/4 or 1/8 while keeping at
            least this ``(width, height)`` (in stored orientation), which is several times
            faster than decoding at full size and resizing.

    Raises:
        UndecodableImage: if the pixels cannot be decoded (corrupt, truncated).
    """
    with _decoding():
        if draft is not None and img.format == "JPEG":
            img.draft(img.mode, draft)
        img.load()
        ImageOps.exif_transpose(img, in_place=True)  # in place: no copy when there is nothing to turn
        return img


def decode_image(data: bytes, *, max_pixels: int | None = None, draft: tuple[int, int] | None = None) -> Image.Image:
    """``open_image`` then ``load_image``: the decoded, upright image."""
    return load_image(open_image(data, max_pixels=max_pixels), draft=draft)


def upright_size(img: Image.Image) -> tuple[int, int]:
    """An opened image's size once its EXIF orientation is applied, from the header alone."""
    w, h = img.size
    try:
        turned = img.getexif().get(0x0112) in (5, 6, 7, 8)  # EXIF orientations that swap the sides
    except Exception:  # noqa: BLE001  (a broken EXIF block: loading will tell)
        turned = False
    return (h, w) if turned else (w, h)


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
    """Resize an RGB image with img2dataset's semantics and antialiased bicubic filtering.

    Bicubic as CLIP's own preprocessing (see ``data_prep.resample``); on photos it differs
    from Lanczos by ~1/255 on average, half of what the JPEG q95 encode that follows changes.

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
    if mode == "center_crop":
        if (w, h) == (size, size):
            return img
        # Resample only the centred square: resize-then-crop without filtering pixels that the
        # crop throws away (the outermost output pixels see the square's edge repeated, not
        # the pixels beyond it).
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        return resample(img, (size, size), (left, top, left + side, top + side))
    side = min(w, h) if mode == "keep_ratio" else max(w, h)
    scale = size / side
    new_w = size if side == w else max(1, round(w * scale))
    new_h = size if side == h else max(1, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = resample(img, (new_w, new_h))
    if mode == "border":
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


def _draft_size(stored: tuple[int, int], size: int, resize_mode: str) -> tuple[int, int] | None:
    """The smallest decode size that still resizes exactly as a full decode would need."""
    if resize_mode == "no":
        return None
    w, h = stored
    side = max(w, h) if resize_mode == "border" else min(w, h)
    if side <= size:
        return None
    return math.ceil(w * size / side), math.ceil(h * size / side)


def check_size(width: int, height: int, min_size: int = 0, max_aspect_ratio: float | None = None) -> None:
    """Apply the ``--min-image-size`` and ``--max-aspect-ratio`` filters.

    Raises:
        RejectedImage: ``image_too_small`` or ``bad_aspect_ratio``.
    """
    if min(width, height) < min_size:
        raise RejectedImage(IMAGE_TOO_SMALL, f"{width}x{height} has a side < {min_size}")
    if max_aspect_ratio is not None and max(width, height) > max_aspect_ratio * min(width, height):
        raise RejectedImage(BAD_ASPECT_RATIO, f"{width}x{height} has an aspect ratio > {max_aspect_ratio}")


def process_image(
    data: bytes,
    *,
    size: int = 256,
    resize_mode: ResizeMode = "center_crop",
    fmt: str = "jpg",
    quality: int = 95,
    background: tuple[int, int, int] = WHITE,
    max_pixels: int | None = None,
    min_size: int = 0,
    max_aspect_ratio: float | None = None,
    fast_decode: bool = True,
) -> EncodedImage:
    """Decode -> filter -> RGB -> resize -> encode, keeping the original (upright) size.

    Args:
        data: Encoded image bytes.
        size, resize_mode: See ``resize_image``.
        fmt, quality: See ``encode_image``.
        background: Colour that transparency and ``border`` padding become.
        max_pixels: Decompression-bomb guard (see ``decode_image``).
        min_size, max_aspect_ratio: Filters on the original size (see ``check_size``).
        fast_decode: Decode large JPEGs at a reduced scale (see ``decode_image``).

    Raises:
        UndecodableImage: if ``data`` is not a readable image.
        RejectedImage: if a filter refuses it.
    """
    img = open_image(data, max_pixels=max_pixels)
    upright = upright_size(img)
    check_size(*upright, min_size, max_aspect_ratio)  # before paying for the decode
    draft = _draft_size(img.size, size, resize_mode) if fast_decode and img.format == "JPEG" else None
    img = load_image(img, draft=draft)
    # A draft decode is already scaled down: the original size is the header's. (Otherwise
    # trust the decode: some formats, like PNG, may keep their EXIF after the pixels.)
    original_width, original_height = upright if draft is not None else img.size
    check_size(original_width, original_height, min_size, max_aspect_ratio)
    img = resize_image(to_rgb(img, background), size, resize_mode, background)
    return EncodedImage(encode_image(img, fmt, quality), img.width, img.height, original_width, original_height)
