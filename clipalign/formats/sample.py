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


def caption_char_limit(context_length: int) -> int:
    """Characters of a caption worth keeping for a tokenizer of ``context_length`` tokens.

    open_clip's tokenizer keeps ``context_length - 2`` BPE tokens, each at least one character
    of the cleaned text; 64 raw characters a token also covers HTML entities and whitespace
    runs that cleaning shrinks. Cutting there first keeps a 50 MB caption from costing seconds.
    """
    return 64 * context_length


def sample_captions(sample: dict[str, Any], max_chars: int | None = None) -> list[str]:
    """The non-empty lines of ``txt``, each cut to ``max_chars``; raises ``BadSample`` if there is none."""
    if TEXT not in sample:
        raise BadSample(MISSING_CAPTION, sample.get(KEY, ""))
    raw = sample[TEXT].split(b"\n")  # split before decoding: a huge caption is never decoded whole
    if max_chars is not None:
        raw = [line[: 4 * max_chars] for line in raw]  # UTF-8: at most 4 bytes a character
    lines = [line.decode("utf-8", errors="replace") for line in raw]
    captions = [c for c in (line.strip()[:max_chars] for line in lines) if c]
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
