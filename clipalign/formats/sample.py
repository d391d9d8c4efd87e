"""A shard sample: its keys, as ``clipalign prep`` and the eval-set writers write them, and how
a reader gets its image, captions and stored token ids.

A sample is webdataset's ``{"__key__": str, ext: bytes, ...}`` with one image (``jpg``,
``png``, ``webp``, ...), ``txt`` (captions, one per line), optionally ``tok.npy`` ((K, L) int32
token ids, one row per caption), ``json`` (metadata), ``cls`` (class index) or ``npy`` (multi-hot).
"""
from __future__ import annotations

import io
import re
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
_WORD = re.compile(r"\S+")


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
    """The non-space characters of a caption worth keeping for a tokenizer of ``context_length``.

    CLIP's BPE tokenizer keeps ``context_length - 2`` tokens, and each stands for at most 24
    characters of the cleaned text (its vocabulary's longest entry, ``blackandwhitephotography``);
    runs of spaces, which it collapses to one, are not counted (``cut_caption``). So a caption
    cut here still holds 64 / 24 > 2.6 times the characters its kept tokens can cover, and
    the tokenizer keeps the same tokens as from the whole caption: the cut never changes a
    caption the tokenizer would keep whole. (Only a caption that its cleaning shrinks by more
    than 2.6 times could tell, e.g. thousands of HTML entities such as ``&amp;``.) It bounds
    the tokenizer's work, which grows with a caption's length (ftfy, and BPE on a long word).
    """
    return context_length * 64


def cut_caption(text: str, limit: int) -> str:
    """``text`` if it is at most ``limit`` characters; else its first ``limit`` non-space
    characters, with each run of whitespace made one space (as the tokenizer does)."""
    if len(text) <= limit:
        return text
    words, kept = [], 0
    for match in _WORD.finditer(text):  # lazily: a 50 MB caption is read only as far as the cut
        word = match.group()[: limit - kept]
        words.append(word)
        kept += len(word)
        if kept >= limit:
            break
    return " ".join(words)


def sample_captions(sample: dict[str, Any], max_chars: int | None = None) -> list[str]:
    """The non-empty lines of ``txt``, each cut to ``max_chars``; raises ``BadSample`` if there is none."""
    if TEXT not in sample:
        raise BadSample(MISSING_CAPTION, sample.get(KEY, ""))
    raw = sample[TEXT].split(b"\n")  # split before decoding: a huge caption is never decoded whole
    if max_chars is not None:
        raw = [line[: 8 * max_chars] for line in raw]  # room for max_chars characters of 4 bytes, and spaces
    lines = [line.decode("utf-8", errors="replace") for line in raw]
    if max_chars is not None:
        lines = [cut_caption(line, max_chars) for line in lines]
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
