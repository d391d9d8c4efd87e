"""Figures written as PNG files (matplotlib with its non-interactive Agg backend)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from clipalign.formats.atomic import replace_file

MAX_LABELLED_CLASSES = 40


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    """Write ``fig`` whole or not at all (a killed or full-disk write leaves no half PNG)."""
    path = Path(path)
    try:
        fig.tight_layout()
        # the format from the final name: the temporary one's suffix would not say it
        return replace_file(path, lambda tmp: fig.savefig(tmp, dpi=100, format=path.suffix.lstrip(".") or "png"))
    finally:
        _pyplot().close(fig)


def confusion_matrix_png(matrix: Sequence[Sequence[int]], classnames: Sequence[str], path: str | os.PathLike,
                         title: str = "") -> Path:
    """A confusion matrix (rows: true class, columns: predicted), each row normalised to recall.

    Up to ``MAX_LABELLED_CLASSES`` classes the cells carry counts and the axes class names;
    above it the figure keeps a fixed size and shows the matrix alone.
    """
    plt = _pyplot()
    import numpy as np

    counts = np.asarray(matrix, dtype=float)
    recall = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    labelled = len(classnames) <= MAX_LABELLED_CLASSES  # beyond that, names and counts are unreadable
    size = 1.0 + 0.55 * min(len(classnames), MAX_LABELLED_CLASSES)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(recall, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    if labelled:
        ax.set_xticks(range(len(classnames)), classnames, rotation=45, ha="right")
        ax.set_yticks(range(len(classnames)), classnames)
        for (i, j), count in np.ndenumerate(counts):
            if count:
                ax.text(j, i, f"{int(count)}", ha="center", va="center", fontsize=8,
                        color="white" if recall[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if title:
        ax.set_title(title)
    return _save(fig, path)


def training_curves_png(records: Sequence[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Loss curves (every ``*_loss`` and the total), temperature, MLM accuracy and samples/s
    against step, from ``metrics.jsonl`` records; panels without data are left out."""
    plt = _pyplot()

    steps = [r["step"] for r in records]
    loss_keys = ["loss"] + sorted({k for r in records for k in r if k.endswith("_loss")})
    panels = [("loss", loss_keys), ("temperature", ["temperature"]), ("MLM accuracy", ["mlm_acc"]),
              ("samples/s", ["samples_per_s"])]
    panels = [(name, [k for k in keys if any(k in r for r in records)]) for name, keys in panels]
    panels = [(name, keys) for name, keys in panels if keys]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (name, keys) in zip(axes[0], panels):
        for key in keys:
            ax.plot(steps, [r.get(key, float("nan")) for r in records], label=key)
        ax.set_title(name)
        ax.set_xlabel("step")
        if len(keys) > 1:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, path)
