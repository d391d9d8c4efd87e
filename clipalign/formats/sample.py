"""A shard sample: its keys, as ``clipalign prep`` and the eval-set writers write them, and how
a reader gets its image, captions and stored token ids.

A sample is webdataset's ``{"__key__": str, ext: bytes, ...}`` with one image (``jpg``,
``png``, ``webp``, ...), ``txt`` (captions, one per line), optionally ``tok.npy`` ((K, L) int32
token ids, one row per caption), ``json`` (metadata), ``cls`` (class index) or ``npy`` (multi-hot).
"""
from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from clipalign.formats.images import IMAGE_EXTENSIONS, decode_image
from clipalign.formats.skips import EMPTY_CAPTION, MISSING_CAPTION, MISSING_IMAGE, BadSample

IMAGE_KEYS: tuple[str, ...] = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
KEY = "__key__"
TEXT = "txt"
TOKENS = "tok.npy"
JSON = "json"
CLASS = "cls"
MULTIHOT = "npy"


def image_key(sample: dict[str, Any]) -> str:
    """The sample's image key; ``BadSample("missing_image")`` if it has none."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise BadSample(MISSING_IMAGE, sample.get(KEY, ""))
    return key


def sample_image(sample: dict[str, Any]) -> Image.Image:
    """The sample's image as RGB; raises ``BadSample`` if it has none or it is undecodable."""
    return decode_image(sample[image_key(sample)], sample.get(KEY, ""))


def sample_text(sample: dict[str, Any]) -> str:
    """The ``txt`` field as text (stripped; ``""`` when absent)."""
    return sample.get(TEXT, b"").decode("utf-8", errors="replace").strip()


def sample_captions(sample: dict[str, Any]) -> list[str]:
    """The non-empty lines of ``txt``; raises ``BadSample`` if there is none."""
    if TEXT not in sample:
        raise BadSample(MISSING_CAPTION, sample.get(KEY, ""))
    lines = sample[TEXT].decode("utf-8", errors="replace").splitlines()
    captions = [c for c in (line.strip() for line in lines) if c]
    if not captions:
        raise BadSample(EMPTY_CAPTION, sample.get(KEY, ""))
    return captions


def sample_tokens(sample: dict[str, Any], context_length: int) -> np.ndarray | None:
    """Stored token ids as (K, L) int64, one row per caption; ``None`` when the sample has
    none or they were made for another context length."""
    raw = sample.get(TOKENS)
    if raw is None:
        return None
    ids = np.load(io.BytesIO(raw), allow_pickle=False)
    if ids.ndim not in (1, 2) or ids.shape[-1] != context_length:
        return None
    return ids.astype(np.int64).reshape(-1, context_length)


def sample_class(sample: dict[str, Any]) -> int:
    return int(sample[CLASS])


def sample_multihot(sample: dict[str, Any]) -> np.ndarray:
    return np.load(io.BytesIO(sample[MULTIHOT]), allow_pickle=False)
