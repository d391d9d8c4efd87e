"""Zero-shot classification and retrieval on CLIP_benchmark ``wds/``-layout sets (the layout:
``clipalign.formats.evalset``), and zero-shot classification of labelled image items.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from clipalign.classify import DEFAULT_TEMPLATES, class_embeddings
from clipalign.embedding import decoded, image_features, iter_shard_samples, open_images, text_features
from clipalign.formats import evalset as evalset_layout
from clipalign.formats.sample import sample_captions, sample_class, sample_multihot
from clipalign.formats.skips import BAD_ROW, SkipCounter
from clipalign.linear_probe import linear_probe
from clipalign.loss import mlm_hits
from clipalign.masking import mask_tokens, masking_ids
from clipalign.metrics import (
    average_precision,
    confusion_matrix,
    macro_f1,
    mean_per_class_recall,
    retrieval_metrics,
    topk_accuracy,
)
from clipalign.model import ClipAlign
from clipalign.precision import autocast, model_device


@dataclass
class EvalSet:
    """A ``wds/``-layout evaluation set."""

    root: Path
    task: str  # "classification" or "retrieval"
    shards: list[str]
    classnames: list[str] | None = None
    templates: list[Any] | None = None
    items: list[tuple[Path, int]] | None = None  # (image path, class) when not read from shards
    bad_rows: int = 0  # manifest rows without a usable image path or label

    @property
    def name(self) -> str:
        return self.root.name


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _classnames(path: Path) -> list[str]:
    """Class names, one per line; line i names class i, so a blank line inside is an error."""
    names = [line.strip() for line in path.read_text().rstrip("\n").splitlines()]
    if "" in names:
        raise ValueError(f"{path}: line {names.index('') + 1} is blank; every class index needs a name")
    return names


def load_eval_set(root: str | Path, split: str = "test", templates: list[str] | None = None) -> EvalSet:
    """The ``split`` of a ``wds/`` set. ``templates`` (``{c}`` = class) replace the set's own.

    Raises:
        FileNotFoundError: naming what is missing.
    """
    root = Path(root)
    shards = evalset_layout.shard_paths(root, split)
    task = evalset_layout.task(root)
    if task == evalset_layout.RETRIEVAL:
        return EvalSet(root, task, shards)
    if task not in evalset_layout.TASKS:
        raise ValueError(f"{root}: dataset type {task!r} is not supported")
    for needed in (evalset_layout.CLASSNAMES, evalset_layout.TEMPLATES):
        if not (root / needed).is_file():
            raise FileNotFoundError(f"classification set without {root / needed}")
    return EvalSet(
        root, task, shards, _classnames(root / evalset_layout.CLASSNAMES),
        templates or _lines(root / evalset_layout.TEMPLATES),
    )


def labelled_eval_set(root: str | Path, classnames: list[str], items: list[tuple[Path, int]], *,
                      bad_rows: int = 0, templates: list[str] | None = None) -> EvalSet:
    """A classification set of ``(image path, class)`` items (an ImageFolder tree or a label
    manifest read by ``data_prep.labelled``), prompted with ``templates`` or CLIP's simple ones."""
    return EvalSet(Path(root), evalset_layout.CLASSIFICATION, [], classnames, templates or list(DEFAULT_TEMPLATES),
                   items=items, bad_rows=bad_rows)


def _embed_set(
    model: ClipAlign, transform: Callable, evalset: EvalSet, parse: Callable[[dict], Any], **kwargs: Any
) -> tuple[torch.Tensor, list[Any], dict[str, int]]:
    """Image features of the set's good samples, ``parse(sample)`` of each, and skip counts."""
    counter = SkipCounter()
    if evalset.items is not None:
        items = open_images(evalset.items, counter)
    else:
        items = decoded(iter_shard_samples(evalset.shards, counter), counter, parse)
    feats, payloads = image_features(model, transform, items, **kwargs)
    if evalset.bad_rows:
        counter.add(BAD_ROW, evalset.bad_rows)
    if not payloads:
        raise ValueError(f"{evalset.root}: no usable image (skipped: {dict(counter.counts)})")
    return feats, payloads, dict(counter.counts)


def zero_shot_classification(
    model: ClipAlign,
    tokenizer: Callable,
    transform: Callable,
    evalset: EvalSet,
    *,
    batch_size: int = 256,
    precision: str = "fp32",
    progress: Callable[..., Any] | None = None,
    probe_train: EvalSet | None = None,
) -> dict[str, Any]:
    """acc@1, acc@5, mean per-class recall, macro F1 and the confusion matrix (rows: true
    class), with each class's text embedding averaged over the templates as CLIP does; with
    ``probe_train`` (the set's train split), a linear probe on the frozen image features too."""
    feats, labels, skipped = _embed_set(model, transform, evalset, sample_class,
                                        batch_size=batch_size, precision=precision, progress=progress)
    classifier = class_embeddings(model, tokenizer, evalset.classnames, evalset.templates, precision=precision)
    logits = 100.0 * feats @ classifier  # (N, C)
    targets = torch.tensor(labels, dtype=torch.long)
    preds = logits.argmax(1)
    acc = topk_accuracy(logits, targets, (1, 5))
    metrics = {
        "acc1": acc[1],
        "acc5": acc[5] if len(evalset.classnames) >= 5 else float("nan"),  # CLIP_benchmark: undefined
        "mean_per_class_recall": mean_per_class_recall(preds, targets),
        "macro_f1": macro_f1(preds, targets),
    }
    return {"task": "zeroshot_classification", "n": len(labels), "n_classes": len(evalset.classnames),
            "chance_acc1": 1.0 / len(evalset.classnames), "metrics": metrics,
            "classnames": evalset.classnames,
            "confusion_matrix": confusion_matrix(preds, targets, len(evalset.classnames)).tolist(),
            "skipped": skipped, **_probe(model, transform, probe_train, feats, targets, batch_size, precision)}


def _probe(model: ClipAlign, transform: Callable, train: EvalSet | None, test_feats: torch.Tensor,
           test_labels: torch.Tensor, batch_size: int, precision: str) -> dict[str, Any]:
    if train is None:
        return {}
    feats, labels, skipped = _embed_set(model, transform, train, sample_class,
                                        batch_size=batch_size, precision=precision)
    probe = linear_probe(feats, torch.tensor(labels), test_feats, test_labels, len(train.classnames))
    return {"linear_probe": {**probe, "skipped": skipped}}  # CLIP_benchmark's lp_* keys: see eval_report.py


def probe_train_split(evalset: EvalSet) -> EvalSet | None:
    """The ``train`` split of a single-label ``wds/`` classification set, if it has one."""
    if evalset.task != evalset_layout.CLASSIFICATION or evalset.items is not None:
        return None
    if not evalset_layout.is_eval_set(evalset.root, "train"):
        return None
    return load_eval_set(evalset.root, split="train", templates=evalset.templates)


def zero_shot_retrieval(
    model: ClipAlign,
    tokenizer: Callable,
    transform: Callable,
    evalset: EvalSet,
    *,
    batch_size: int = 256,
    precision: str = "fp32",
    ks: tuple[int, ...] = (1, 5, 10),
    progress: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Image→text and text→image recall@k, mean and median rank (an image may have several
    captions), and for models with a text-only MLM head its accuracy on the held-out captions."""
    img_feats, captions, skipped = _embed_set(
        model, transform, evalset, sample_captions,
        batch_size=batch_size, precision=precision, progress=progress,
    )
    texts = [c for caps in captions for c in caps]
    text_to_image = torch.tensor([i for i, caps in enumerate(captions) for _ in caps], dtype=torch.long)
    txt_feats = text_features(model, tokenizer, texts, precision=precision)
    metrics = retrieval_metrics(img_feats, txt_feats, text_to_image, ks)
    # An image-conditioned head needs each caption's image tokens: its accuracy is the training log's.
    if getattr(model, "mlm_head", None) is not None and getattr(model, "mlm_fusion", None) is None:
        metrics["mlm_acc"] = heldout_mlm_accuracy(model, tokenizer, texts, precision=precision)
    return {"task": "zeroshot_retrieval", "n": len(captions), "n_texts": len(texts), "metrics": metrics,
            "skipped": skipped}


@torch.no_grad()
def heldout_mlm_accuracy(
    model: ClipAlign, tokenizer: Callable, texts: list[str], *, batch_size: int = 512, precision: str = "fp32",
    seed: int = 0,
) -> float:
    """Top-1 accuracy of the MLM head on ``texts``, masked as in training with a fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    hits = total = 0
    for start in range(0, len(texts), batch_size):
        ids = tokenizer(texts[start : start + batch_size])
        masked, labels = mask_tokens(ids, **masking_ids(tokenizer, model.mask_id), generator=generator)
        device = model_device(model)
        with autocast(precision, device.type):
            logits, targets = model.mlm_logits(masked.to(device), labels.to(device))
        hits += mlm_hits(logits, targets)
        total += targets.numel()
    return hits / total


def zero_shot_multilabel(
    model: ClipAlign,
    tokenizer: Callable,
    transform: Callable,
    evalset: EvalSet,
    *,
    batch_size: int = 256,
    precision: str = "fp32",
    progress: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Mean average precision over classes, each image carrying a multi-hot ``npy`` label."""
    feats, labels, skipped = _embed_set(model, transform, evalset, sample_multihot,
                                        batch_size=batch_size, precision=precision, progress=progress)
    targets = torch.as_tensor(np.stack(labels))
    if targets.ndim != 2 or targets.shape[1] != len(evalset.classnames):
        raise ValueError(f"{evalset.root}: npy labels must be multi-hot vectors of {len(evalset.classnames)} classes")
    scores = 100.0 * feats @ class_embeddings(model, tokenizer, evalset.classnames, evalset.templates,
                                              precision=precision)
    ap = average_precision(scores, targets)
    return {"task": "zeroshot_classification", "n": len(labels), "n_classes": len(evalset.classnames),
            "metrics": {"mean_average_precision": ap.mean().item()},
            "average_precision_per_class": dict(zip(evalset.classnames, ap.tolist())), "skipped": skipped}


def evaluate(model: ClipAlign, tokenizer: Callable, transform: Callable, evalset: EvalSet, **kwargs: Any) -> dict[str, Any]:
    """Run the set's task."""
    task = {evalset_layout.RETRIEVAL: zero_shot_retrieval, evalset_layout.MULTILABEL: zero_shot_multilabel}.get(
        evalset.task, zero_shot_classification)
    return task(model, tokenizer, transform, evalset, **kwargs)
