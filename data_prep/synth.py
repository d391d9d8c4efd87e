"""The embedded synthetic corpus: coloured shapes on soft backgrounds, with captions.

Every image is a pure function of ``(seed, split, index)``: its generator is
``numpy.random.default_rng([seed, SPLIT_IDS[split], index])``. So the corpus is
byte-identical for a seed, and any one image can be regenerated alone.

A fixed set of colour-shape pairs (``HELD_OUT_PAIRS``) never appears in training and
is used by the ``*_unseen`` evaluation sets to test compositional generalisation.

The corpus folder, as ``write_corpus`` lays it out::

    train/manifest.csv, train/images/<index>.png    the training rows (columns image, caption)
    eval/<set>/{test,train}/                        held-out sets in CLIP_benchmark's wds/ layout
    synth.json                                      what was generated, with each part's path
"""
from __future__ import annotations

import csv
import io
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import numpy as np
from PIL import Image

from clipalign.formats.atomic import replace_file, write_bytes, write_json
from data_prep.evalsets import write_classification_set, write_retrieval_set
from data_prep.scenes import (
    COLOR_TEMPLATES,
    COLORS,
    HELD_OUT_PAIRS,
    POSITIONS,
    SEEN_PAIRS,
    SHAPE_TEMPLATES,
    SHAPES,
    SIZES,
    SPLIT_IDS,
    Scene,
    caption_scene,
    render_scene,
    sample_scene,
)

T = TypeVar("T")

# The corpus folder's layout (see the module docstring).
TRAIN_DIR = "train"
EVAL_DIR = "eval"
MANIFEST = "manifest.csv"
IMAGES_DIR = "images"
INFO_FILE = "synth.json"
CLASSIFICATION_SETS = ("shape_seen", "shape_unseen", "color_seen", "color_unseen")  # each with a train split
RETRIEVAL_SET = "retrieval"
EVAL_SETS = (*CLASSIFICATION_SETS, RETRIEVAL_SET)
MIN_IMAGE_SIZE = 16

def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator that fully determines example ``index`` of ``split``."""
    return np.random.default_rng([seed, SPLIT_IDS[split], index])


def train_example(seed: int, index: int, image_size: int = 64) -> tuple[Image.Image, str, Scene]:
    """Training example ``index``: (image, caption, scene), never using a held-out pair."""
    rng = example_rng(seed, "train", index)
    scene = sample_scene(rng, SEEN_PAIRS)
    return render_scene(scene, rng, image_size), caption_scene(scene, rng)[0], scene


def classification_example(
    seed: int, split: str, index: int, image_size: int = 64
) -> tuple[Image.Image, int, Scene]:
    """Example ``index`` of a ``{shape,color}_{seen,unseen}`` set: (image, label, scene).

    Single-shape images, cycling through the classes that have allowed pairs.
    """
    target, kind = split.split("_")
    pairs = HELD_OUT_PAIRS if kind == "unseen" else SEEN_PAIRS
    names = SHAPES if target == "shape" else COLORS
    field = 1 if target == "shape" else 0
    labels = [i for i, name in enumerate(names) if any(p[field] == name for p in pairs)]
    label = labels[index % len(labels)]
    rng = example_rng(seed, split, index)
    scene = sample_scene(rng, [p for p in pairs if p[field] == names[label]], n_shapes=1)
    return render_scene(scene, rng, image_size), label, scene


def retrieval_example(seed: int, index: int, image_size: int = 64) -> tuple[Image.Image, list[str], Scene]:
    """Retrieval example ``index``: (image, two different captions, scene).

    One or two shapes (half each); in a third of the images the first shape uses a held-out pair.
    """
    rng = example_rng(seed, "retrieval", index)
    scene = sample_scene(rng, SEEN_PAIRS, n_shapes=1 if rng.random() < 0.5 else 2)
    if rng.random() < 1 / 3:  # the other shape, if any, is seen, so the pairs stay distinct
        color, shape = HELD_OUT_PAIRS[int(rng.integers(len(HELD_OUT_PAIRS)))]
        scene = (replace(scene[0], color=color, shape=shape), *scene[1:])
    return render_scene(scene, rng, image_size), caption_scene(scene, rng, k=2), scene


def png_bytes(image: Image.Image) -> bytes:
    """Encode as PNG (deterministic bytes)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# Module-level so worker processes can run them; each returns encoded PNG bytes.
def _train_item(index: int, seed: int, image_size: int) -> tuple[bytes, str]:
    image, caption, _ = train_example(seed, index, image_size)
    return png_bytes(image), caption


# Index offset of a classification set's ``train`` split (for linear probes): its images come
# from generator keys that no ``test`` index of any realistic size reaches.
TRAIN_SPLIT_OFFSET = 1 << 30


def _classification_item(index: int, seed: int, split: str, image_size: int, offset: int = 0) -> tuple[bytes, int]:
    image, label, _ = classification_example(seed, split, offset + index, image_size)
    return png_bytes(image), label


def _retrieval_item(index: int, seed: int, image_size: int) -> tuple[bytes, list[str]]:
    image, captions, _ = retrieval_example(seed, index, image_size)
    return png_bytes(image), captions


def _ordered_map(fn: Callable[[int], T], n: int, workers: int, progress: Callable[[int], None] | None) -> Iterator[T]:
    """``fn(0), ..., fn(n - 1)`` in order, computed in ``workers`` processes.

    Closed early (a full disk while writing), the queued work is dropped and the running
    chunks finish: no worker is killed while it may hold a queue's lock.
    """
    if workers <= 1:
        results: Iterator[T] = map(fn, range(n))
        pool = None
    else:
        pool = ProcessPoolExecutor(workers, multiprocessing.get_context("fork"))
        results = pool.map(fn, range(n), chunksize=64)
    try:
        for item in results:
            if progress is not None:
                progress(1)
            yield item
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


_BAD_KINDS = ("random_bytes", "truncated_png", "empty_caption")


def _bad_rows(seed: int, n: int, n_bad: int, out_dir: Path, image_size: int) -> dict[int, tuple[str, str]]:
    """Create the bad examples' files; return {manifest position: (image path, caption)}."""
    rng = np.random.default_rng([seed, SPLIT_IDS["bad"]])
    positions = sorted(int(p) for p in rng.choice(n + n_bad, size=n_bad, replace=False))
    rows = {}
    for j, pos in enumerate(positions):
        kind = "missing" if j == 0 else _BAD_KINDS[(j - 1) % len(_BAD_KINDS)]
        name = f"{IMAGES_DIR}/{kind}_{j:05d}.png"
        data, caption = _train_item(n + j, seed, image_size)
        if kind == "random_bytes":
            data = rng.bytes(int(rng.integers(64, 2048)))
        elif kind == "truncated_png":
            data = data[: len(data) // 2]
        elif kind == "empty_caption":
            caption = ""
        if kind != "missing":
            write_bytes(out_dir / name, data)
        rows[pos] = (name, caption)
    return rows


def write_train(
    out_dir: str | os.PathLike,
    *,
    n: int,
    seed: int,
    image_size: int = 64,
    n_bad: int = 0,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Write ``out_dir/images/*.png`` and ``out_dir/manifest.csv`` (columns image, caption).

    ``n_bad`` extra rows are mixed in at seeded positions: one missing file, then
    random bytes, a truncated PNG and an empty caption in turn.
    """
    out_dir = Path(out_dir)
    (out_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    bad = _bad_rows(seed, n, n_bad, out_dir, image_size) if n_bad else {}
    good = _ordered_map(partial(_train_item, seed=seed, image_size=image_size), n, workers, progress)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["image", "caption"])
            index = 0
            for pos in range(n + n_bad):
                if pos in bad:
                    writer.writerow(bad[pos])
                    continue
                data, caption = next(good)
                name = f"{IMAGES_DIR}/{index:09d}.png"
                write_bytes(out_dir / name, data)
                writer.writerow([name, caption])
                index += 1

    replace_file(out_dir / MANIFEST, write)  # every image it names is written before it appears
    return {"path": f"{TRAIN_DIR}/{MANIFEST}", "images": n, "bad_rows": n_bad, "rows": n + n_bad}


def write_eval_sets(
    out_dir: str | os.PathLike,
    *,
    n: int,
    seed: int,
    image_size: int = 64,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
) -> dict[str, dict]:
    """Write the held-out sets ``out_dir/<set>`` in CLIP_benchmark's ``wds/`` layout, ``n`` images each.

    Classification sets also get a ``train`` split of ``n`` other images, for linear probes.
    """
    out_dir = Path(out_dir)
    info: dict[str, dict] = {}
    for split in CLASSIFICATION_SETS:
        names, templates = (SHAPES, SHAPE_TEMPLATES) if split.startswith("shape") else (COLORS, COLOR_TEMPLATES)
        for part, offset in (("test", 0), ("train", TRAIN_SPLIT_OFFSET)):
            fn = partial(_classification_item, seed=seed, split=split, image_size=image_size, offset=offset)
            count = write_classification_set(out_dir / split, _ordered_map(fn, n, workers, progress), names,
                                             templates, split=part)
        info[split] = {"path": f"{EVAL_DIR}/{split}", "type": "classification", "samples": count, "classes": len(names),
                       "splits": ["test", "train"]}
    fn = partial(_retrieval_item, seed=seed, image_size=image_size)
    count = write_retrieval_set(out_dir / RETRIEVAL_SET, _ordered_map(fn, n, workers, progress))
    info[RETRIEVAL_SET] = {"path": f"{EVAL_DIR}/{RETRIEVAL_SET}", "type": "retrieval", "samples": count,
                           "captions_per_image": 2}
    return info


def corpus_images(n: int, n_eval: int) -> int:
    """How many images ``write_corpus`` generates: ``n`` training ones and ``n_eval`` per held-out
    split (each classification set has a test and a train split, the retrieval set a test split)."""
    return n + (2 * len(CLASSIFICATION_SETS) + 1) * n_eval


def check_corpus_options(out_dir: str | os.PathLike, *, n: int, seed: int, image_size: int, n_eval: int,
                         n_bad: int, workers: int) -> None:
    """``ValueError`` (one line, naming the option) for options ``write_corpus`` cannot use."""
    for name, value, low in (("n", n, 1), ("n_eval", n_eval, 1), ("n_bad", n_bad, 0),
                             ("image_size", image_size, MIN_IMAGE_SIZE), ("workers", workers, 1), ("seed", seed, 0)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir} exists and is not a folder")


def write_corpus(
    out_dir: str | os.PathLike,
    *,
    n: int = 20_000,
    seed: int = 0,
    image_size: int = 64,
    n_eval: int = 600,
    n_bad: int = 0,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Write ``train/``, ``eval/<set>/`` and ``synth.json`` under ``out_dir``; return synth.json's content.

    The files do not depend on ``workers``. ``progress`` gets ``1`` per generated image
    (``corpus_images(n, n_eval)`` in all).

    Raises:
        ValueError: options it cannot use (``check_corpus_options``), before anything is written.
    """
    check_corpus_options(out_dir, n=n, seed=seed, image_size=image_size, n_eval=n_eval, n_bad=n_bad, workers=workers)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    common = {"seed": seed, "image_size": image_size, "workers": workers, "progress": progress}
    splits = {TRAIN_DIR: write_train(out_dir / TRAIN_DIR, n=n, n_bad=n_bad, **common)}
    splits.update(write_eval_sets(out_dir / EVAL_DIR, n=n_eval, **common))
    info = {
        "seed": seed,
        "image_size": image_size,
        "n_train": n,
        "n_eval": n_eval,
        "n_bad": n_bad,
        "shapes": list(SHAPES),
        "colors": list(COLORS),
        "sizes": list(SIZES),
        "positions": list(POSITIONS),
        "held_out_pairs": [list(p) for p in HELD_OUT_PAIRS],
        "splits": splits,
    }
    write_json(out_dir / INFO_FILE, info)
    return info
