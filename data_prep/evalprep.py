"""A user's own evaluation data → CLIP_benchmark's ``wds/`` layout, so both tools can run it.

Classification from an ImageFolder tree or an (image, label) manifest; retrieval from an
(image, caption) manifest, where rows naming the same image give it several captions.
Unreadable images are skipped and counted, as in ``prep``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from clipalign.formats.images import DEFAULT_MAX_PIXELS
from clipalign.formats.skips import BAD_ROW, EMPTY_CAPTION, MISSING_IMAGE, UNDECODABLE_IMAGE, SkipCounter
from data_prep.evalsets import write_classification_set, write_retrieval_set
from data_prep.images import RejectedImage, UndecodableImage, process_image
from data_prep.labelled import open_labelled
from data_prep.manifest import open_records


def _encoded_images(items: Iterable[tuple[Path, object]], skipped: SkipCounter, *, image_size: int, resize_mode: str,
                    image_format: str, quality: int) -> Iterator[tuple[bytes, object]]:
    for path, payload in items:
        try:
            data = Path(path).read_bytes()
            encoded = process_image(data, size=image_size, resize_mode=resize_mode, fmt=image_format, quality=quality,
                                    max_pixels=DEFAULT_MAX_PIXELS)
            yield encoded.data, payload
        except FileNotFoundError:
            skipped.add(MISSING_IMAGE)
        except RejectedImage as err:  # too many pixels to decode: skipped like prep's training images
            skipped.add(err.reason)
        except (OSError, UndecodableImage):
            skipped.add(UNDECODABLE_IMAGE)


def classification_set(
    source: str | os.PathLike,
    out: str | os.PathLike,
    templates: Sequence[str],
    *,
    image_col: str = "image",
    label_col: str = "label",
    split: str = "test",
    image_size: int = 224,
    resize_mode: str = "center_crop",
    image_format: str = "png",
    quality: int = 95,
) -> dict:
    """Write ``source`` (ImageFolder or label manifest) as the ``split`` of a ``wds/``
    classification set with prompt ``templates`` (``{c}`` = class name)."""
    labelled = open_labelled(source, image_col=image_col, label_col=label_col)
    skipped = SkipCounter()
    skipped.add(BAD_ROW, len(labelled.bad_rows))
    samples = _encoded_images(labelled.items, skipped, image_size=image_size, resize_mode=resize_mode,
                              image_format=image_format, quality=quality)
    written = write_classification_set(out, samples, labelled.classnames, templates, split=split,
                                       image_format=image_format)
    return {"task": "classification", "written": written, "classes": len(labelled.classnames),
            "skipped": dict(skipped.counts)}


def retrieval_set(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    image_col: str = "image",
    caption_col: str = "caption",
    split: str = "test",
    image_size: int = 224,
    resize_mode: str = "center_crop",
    image_format: str = "png",
    quality: int = 95,
) -> dict:
    """Write an (image, caption) manifest as the ``split`` of a ``wds/`` retrieval set, one
    sample per image."""
    captions: dict[Path, list[str]] = {}
    skipped = SkipCounter()
    for record in open_records(source, image_col=image_col, caption_col=caption_col):
        if record.error or record.path is None or not record.caption:
            skipped.add(BAD_ROW if record.error else EMPTY_CAPTION)
            continue
        captions.setdefault(record.path, []).append(" ".join(record.caption.split()))
    samples = _encoded_images(captions.items(), skipped, image_size=image_size, resize_mode=resize_mode,
                              image_format=image_format, quality=quality)
    written = write_retrieval_set(out, samples, split=split, image_format=image_format)
    return {"task": "retrieval", "written": written, "skipped": dict(skipped.counts)}
