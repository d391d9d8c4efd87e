"""Write evaluation sets in CLIP_benchmark's ``wds/`` layout (described in ``clipalign.formats.evalset``)."""
from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
from PIL import Image

from clipalign.formats import evalset as layout
from clipalign.formats.evalset import CLASSIFICATION, MULTILABEL, RETRIEVAL
from clipalign.formats.sample import CLASS, KEY, MULTIHOT, TEXT
from data_prep.images import IMAGE_FORMATS, encode_image
from data_prep.shards import ShardSink

ImageLike = Union[Image.Image, bytes]


def _encoded(image: ImageLike, fmt: str) -> bytes:
    # Bytes are taken as already encoded in `fmt`; images are encoded losslessly for png.
    return image if isinstance(image, (bytes, bytearray)) else encode_image(image.convert("RGB"), fmt)


def _write_lines(path: Path, lines: Iterable[str]) -> None:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def _shards(root: Path, split: str, samples: Iterable[dict], shard_size: int) -> int:
    """Write samples as ``root/split/{0..n-1}.tar`` + ``nshards.txt``; return the sample count."""
    split_dir = root / split
    split_dir.mkdir(parents=True, exist_ok=True)
    for old in split_dir.glob("*.tar"):  # stale shards of an earlier, larger run
        if re.fullmatch(r"\d+\.tar", old.name):
            old.unlink()
    with ShardSink(split_dir, pattern=layout.SHARD_PATTERN, maxcount=shard_size) as sink:
        for sample in samples:
            sink.write(sample)
    sizes = sink.close()
    layout.nshards_file(root, split).write_text(f"{len(sizes)}\n")
    return sink.total


def _check_format(image_format: str) -> None:
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")


def write_classification_set(
    root: str | os.PathLike,
    samples: Iterable[tuple[ImageLike, int]],
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    split: str = "test",
    image_format: str = "png",
    shard_size: int = 10_000,
    multilabel: bool = False,
) -> int:
    """Write a zero-shot classification set; return the number of samples.

    Args:
        root: The dataset root (created if missing).
        samples: ``(image, class index)`` pairs, or with ``multilabel`` ``(image, multi-hot
            vector of len(classnames))``; an image is a PIL image or bytes already encoded
            as ``image_format``.
        classnames: Class names, index ``i`` names label ``i``.
        templates: Prompt templates with ``{c}`` where the class name goes.
        split: Split folder name.
        image_format: ``png``, ``jpg`` or ``webp``.
        shard_size: Samples per tar at most.
        multilabel: labels are multi-hot vectors, stored as ``npy`` (``dataset_type.txt``:
            "multilabel"), as CLIP_benchmark writes multi-label sets.
    """
    _check_format(image_format)
    bad = [t for t in templates if "{c}" not in t]
    if bad:
        raise ValueError(f"templates without '{{c}}': {bad}")
    if any("\n" in c for c in classnames):
        raise ValueError("class names must not contain newlines")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _write_lines(root / layout.CLASSNAMES, classnames)
    _write_lines(root / layout.TEMPLATES, templates)
    _write_lines(root / layout.DATASET_TYPE, [MULTILABEL if multilabel else CLASSIFICATION])

    def label_entry(i: int, label: object) -> dict:
        if multilabel:
            vector = np.asarray(label)
            if vector.shape != (len(classnames),):
                raise ValueError(f"sample {i}: multi-hot label of shape {vector.shape}, expected ({len(classnames)},)")
            buf = io.BytesIO()
            np.save(buf, vector)
            return {MULTIHOT: buf.getvalue()}
        if not 0 <= int(label) < len(classnames):
            raise ValueError(f"sample {i}: label {label} outside 0..{len(classnames) - 1}")
        return {CLASS: str(int(label))}

    def encoded() -> Iterable[dict]:
        for i, (image, label) in enumerate(samples):
            yield {KEY: f"s{i:07d}", image_format: _encoded(image, image_format), **label_entry(i, label)}

    return _shards(root, split, encoded(), shard_size)


def write_retrieval_set(
    root: str | os.PathLike,
    samples: Iterable[tuple[ImageLike, Sequence[str]]],
    *,
    split: str = "test",
    image_format: str = "png",
    shard_size: int = 10_000,
) -> int:
    """Write a zero-shot retrieval set; return the number of samples.

    Args:
        root: The dataset root (created if missing).
        samples: ``(image, captions)`` pairs; captions must be non-empty and one-line.
        split: Split folder name.
        image_format: ``png``, ``jpg`` or ``webp``.
        shard_size: Samples per tar at most.
    """
    _check_format(image_format)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _write_lines(root / layout.DATASET_TYPE, [RETRIEVAL])

    def encoded() -> Iterable[dict]:
        for i, (image, captions) in enumerate(samples):
            if isinstance(captions, str) or not captions:
                raise ValueError(f"sample {i}: captions must be a non-empty list of strings")
            if any("\n" in c or not c.strip() for c in captions):
                raise ValueError(f"sample {i}: captions must be non-empty single lines")
            yield {KEY: f"s{i:07d}", image_format: _encoded(image, image_format), TEXT: "\n".join(captions)}

    return _shards(root, split, encoded(), shard_size)
