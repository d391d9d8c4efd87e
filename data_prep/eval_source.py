"""Open any evaluation source as an ``EvalSet``: a ``wds/`` set, an ImageFolder tree or a label manifest."""
from __future__ import annotations

import os
from pathlib import Path

from clipalign.evaluate import EvalSet, labelled_eval_set, load_eval_set
from clipalign.formats import evalset as evalset_layout
from data_prep.labelled import open_labelled


def open_eval_source(
    source: str | os.PathLike,
    split: str = "test",
    templates: list[str] | None = None,
    *,
    image_col: str = "image",
    label_col: str = "label",
) -> EvalSet:
    """Any evaluation source: a ``wds/`` set, an ImageFolder tree (class = sub-folder) or a
    CSV/TSV/JSONL manifest of (``image_col``, ``label_col``). ``templates`` (``{c}`` = class)
    replace the set's own or, for sets without any, CLIP's simple prompts.

    Raises:
        FileNotFoundError: naming what is missing.
    """
    source = Path(source)
    if not evalset_layout.is_eval_set(source, split) and (source.is_file() or _is_image_folder(source)):
        labelled = open_labelled(source, image_col=image_col, label_col=label_col)
        return labelled_eval_set(source, labelled.classnames, labelled.items, bad_rows=len(labelled.bad_rows),
                                 templates=templates)
    return load_eval_set(source, split, templates)


def _is_image_folder(root: Path) -> bool:
    return root.is_dir() and any(p.is_dir() for p in root.iterdir()) and not (root / evalset_layout.DATASET_TYPE).exists()
