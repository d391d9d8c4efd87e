"""CLIP_benchmark's ``wds/`` evaluation-set layout: the names, and the checks every reader makes.

Classification root::

    ROOT/classnames.txt                          one class name per line (line i names class i)
    ROOT/zeroshot_classification_templates.txt   one template per line, ``{c}`` = class name
    ROOT/dataset_type.txt                        "classification" (the default), "multilabel" or "retrieval"
    ROOT/<split>/nshards.txt                     number of shards
    ROOT/<split>/0.tar, 1.tar, ...               samples: __key__, <png|jpg|webp>, and cls (npy: multi-hot) or txt

A retrieval root is the same without classnames/templates, and each sample has ``txt``
(one caption per line) instead of ``cls``.
"""
from __future__ import annotations

import os
from pathlib import Path

CLASSIFICATION = "classification"
MULTILABEL = "multilabel"
RETRIEVAL = "retrieval"
TASKS = (CLASSIFICATION, MULTILABEL, RETRIEVAL)

CLASSNAMES = "classnames.txt"
TEMPLATES = "zeroshot_classification_templates.txt"
DATASET_TYPE = "dataset_type.txt"
NSHARDS = "nshards.txt"
SHARD_PATTERN = "%d.tar"  # webdataset ShardWriter pattern of a split's shards


def nshards_file(root: str | os.PathLike, split: str = "test") -> Path:
    return Path(root) / split / NSHARDS


def is_eval_set(root: str | os.PathLike, split: str = "test") -> bool:
    """Whether ``root`` holds the ``split`` of a ``wds/`` set (its ``nshards.txt``)."""
    return nshards_file(root, split).is_file()


def shard_file(root: str | os.PathLike, split: str, i: int) -> Path:
    return Path(root) / split / (SHARD_PATTERN % i)


def shard_paths(root: str | os.PathLike, split: str = "test") -> list[str]:
    """The split's shards as its ``nshards.txt`` lists them.

    Raises:
        FileNotFoundError: no ``nshards.txt``, or a listed shard is missing.
    """
    listing = nshards_file(root, split)
    if not listing.is_file():
        raise FileNotFoundError(f"not a wds/ evaluation set (no {listing})")
    shards = [str(shard_file(root, split, i)) for i in range(int(listing.read_text()))]
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        raise FileNotFoundError(f"{listing} lists {len(shards)} shards but {missing[0]} is missing")
    return shards


def task(root: str | os.PathLike) -> str:
    """The set's task from ``dataset_type.txt`` (``classification`` when absent)."""
    type_file = Path(root) / DATASET_TYPE
    return type_file.read_text().strip().lower() if type_file.is_file() else CLASSIFICATION
