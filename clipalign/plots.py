"""Figures written as PNG files (matplotlib with its non-interactive Agg backend)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

MAX_LABELLED_CLASSES = 40


def confusion_matrix_png(matrix: Sequence[Sequence[int]], classnames: Sequence[str], path: str | os.PathLike,
                         title: str = "") -> Path:
    """A confusion matrix (rows: true class, columns: predicted), each row normalised to recall.

    Up to ``MAX_LABELLED_CLASSES`` classes the cells carry counts and the axes class names;
    above it the figure keeps a fixed size and shows the matrix alone.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
