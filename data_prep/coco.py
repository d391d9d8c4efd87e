"""Read a COCO captions file (``captions_*.json`` + an image folder) as records.

COCO gives several captions per image. ``caption_mode`` picks the samples:

* ``all``:   one sample per image, every caption kept (``txt`` holds one per line,
  like CLIP_benchmark's retrieval sets);
* ``first``: one sample per image with its first caption;
* ``each``:  one sample per caption (the image is repeated).

Images are ordered by id and captions by annotation id, so the records are stable.
The json is read whole (COCO files are tens of MB); the records are then yielded lazily.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Iterator

from data_prep.records import ManifestError, Record, make_record

CAPTION_MODES: tuple[str, ...] = ("all", "first", "each")


def read_coco(
    path: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    caption_mode: str = "all",
) -> Iterator[Record]:
    """Stream records from a COCO captions json.

    Args:
        path: The ``captions_*.json`` file (``images`` + ``annotations`` lists).
        image_root: Folder holding the ``file_name``s (default: the json's folder).
        caption_mode: ``all``, ``first`` or ``each``.

    Raises:
        ManifestError: if the file is not a COCO captions json or the mode is unknown.
    """
    if caption_mode not in CAPTION_MODES:
        raise ManifestError(f"caption_mode must be one of {CAPTION_MODES}, got {caption_mode!r}")
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as err:  # ValueError: bad JSON or not UTF-8
        raise ManifestError(f"{path} is not a readable COCO captions json ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise ManifestError(f"{path} is not a COCO captions json (needs 'images' and 'annotations' lists)")
    captions: dict[object, list[tuple[object, str]]] = defaultdict(list)
    for ann in data["annotations"]:
        if isinstance(ann, dict) and "image_id" in ann and isinstance(ann.get("caption"), str):
            captions[ann["image_id"]].append((ann.get("id", 0), ann["caption"]))
    images = sorted((im for im in data["images"] if isinstance(im, dict) and "id" in im), key=lambda im: im["id"])
    root = Path(image_root) if image_root is not None else path.parent
    return _coco_rows(images, captions, root, caption_mode)


def _coco_rows(images: list[dict], captions: dict, root: Path, mode: str) -> Iterator[Record]:
    index = 0
    for im in images:
        caps = [c.strip() for _, c in sorted(captions.get(im["id"], []), key=lambda t: t[0])]
        source = str(im.get("file_name", ""))
        extra = {"image_id": im["id"]}
        if mode == "each":
            for cap in caps or [None]:
                yield make_record(index, root, source, cap, extra)
                index += 1
            continue
        record = make_record(index, root, source, caps[0] if caps else None, extra)
        if mode == "all" and caps:
            record = replace(record, captions=tuple(caps))
        yield record
        index += 1
