"""Zero-shot classification of a user's own images against class names."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, Union

import torch
from open_clip import SIMPLE_IMAGENET_TEMPLATES, build_zero_shot_classifier

from clipalign.embedding import image_features, open_images
from clipalign.formats.images import image_files
from clipalign.formats.skips import SkipCounter
from clipalign.model import ClipAlign
from clipalign.precision import autocast, model_device

Template = Union[str, Callable[[str], str]]
# CLIP's 7 "simple" ImageNet prompts, as ``{c}`` strings (the form of CLIP_benchmark's files).
DEFAULT_TEMPLATES: tuple[str, ...] = tuple(t("{c}") for t in SIMPLE_IMAGENET_TEMPLATES)


def as_template_fns(templates: Sequence[Template]) -> list[Callable[[str], str]]:
    """Templates as callables; a string uses ``{c}`` (CLIP_benchmark's files) where the class goes."""
    return [t if callable(t) else (lambda c, t=t: t.format(c=c)) for t in templates]


@torch.no_grad()
def class_embeddings(
    model: ClipAlign,
    tokenizer: Callable,
    classnames: Sequence[str],
    templates: Sequence[Template],
    *,
    texts_per_batch: int = 512,
    precision: str = "fp32",
) -> torch.Tensor:
    """(D, C) classifier: per class, the normalised mean of its normalised template embeddings.

    Classes are encoded ``texts_per_batch // len(templates)`` at a time, so 1000 classes × 80
    templates never form one giant batch.
    """
    device = model_device(model)
    with autocast(precision, device.type):
        classifier = build_zero_shot_classifier(
            model, tokenizer, list(classnames), as_template_fns(templates),
            num_classes_per_batch=max(1, texts_per_batch // len(templates)), device=device,
        )
    return classifier.float().cpu()


def expand_images(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given, and the image files found (recursively, sorted) in folders. A given path that
    is not a regular file (a FIFO, a device) is kept: reading it counts it as ``not_a_file``."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += image_files(item)
        else:
            paths.append(item)
    return paths


def classify_images(
    model: ClipAlign,
    transform: Callable,
    classifier: torch.Tensor,
    classnames: Sequence[str],
    paths: Iterable[Path],
    *,
    top_k: int = 3,
    batch_size: int = 64,
    precision: str = "fp32",
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Top-``k`` classes of each readable image, with softmax probabilities at the model's
    learned temperature.

    Returns:
        ``(results, skipped)``: one ``{"path", "predictions": [{"class", "prob"}, ...]}`` per
        image in input order, and unreadable files counted by reason.
    """
    counter = SkipCounter()
    items = open_images(((p, p) for p in paths), counter)
    feats, kept = image_features(model, transform, items, batch_size=batch_size, precision=precision)
    if not kept:
        return [], dict(counter.counts)
    probs = (model.logit_scale.exp().item() * feats @ classifier).softmax(dim=-1)  # (N, C)
    top = probs.topk(min(top_k, len(classnames)), dim=-1)
    results = [
        {"path": str(path), "predictions": [{"class": classnames[i], "prob": p} for p, i in zip(ps.tolist(), ix.tolist())]}
        for path, ps, ix in zip(kept, top.values, top.indices)
    ]
    return results, dict(counter.counts)
