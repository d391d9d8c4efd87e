"""Labelled image collections for evaluation: an ImageFolder tree, or a manifest of (image, label).

Both give class names and ``(image path, class index)`` items, in a stable order, so they can
be evaluated directly (``data_prep.eval_source``) or written in CLIP_benchmark's ``wds/`` layout.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from clipalign.formats.images import image_files
from data_prep.manifest import open_records
from data_prep.records import ManifestError, Record


@dataclass
class LabelledImages:
    """Class names and the items that carry them; rows without a usable label are kept apart."""

    classnames: list[str]
    items: list[tuple[Path, int]]
    bad_rows: list[Record] = field(default_factory=list)


def image_folder(root: str | os.PathLike) -> LabelledImages:
    """torchvision's ImageFolder layout: one sub-folder per class (sorted), images below it."""
    root = Path(root)
    classnames = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not classnames:
        raise ManifestError(f"{root} holds no class sub-folders (ImageFolder layout: ROOT/<class>/<image>)")
    items = [(path, label) for label, name in enumerate(classnames) for path in image_files(root / name)]
    return LabelledImages(classnames, items)


def label_manifest(path: str | os.PathLike, *, image_col: str = "image", label_col: str = "label") -> LabelledImages:
    """A CSV/TSV/JSONL manifest of (image, label); class names are the sorted distinct labels."""
    rows, bad = [], []
    for record in open_records(path, image_col=image_col, caption_col=label_col):
        usable = record.caption and record.path is not None and not record.error
        (rows if usable else bad).append(record)
    classnames = sorted({r.caption for r in rows})
    index = {name: i for i, name in enumerate(classnames)}
    return LabelledImages(classnames, [(r.path, index[r.caption]) for r in rows], bad)


def open_labelled(source: str | os.PathLike, *, image_col: str = "image", label_col: str = "label") -> LabelledImages:
    """``image_folder`` for a folder, ``label_manifest`` for a manifest file."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"input not found: {source}")
    if source.is_dir():
        return image_folder(source)
    return label_manifest(source, image_col=image_col, label_col=label_col)

