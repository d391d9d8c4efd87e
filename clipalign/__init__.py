"""clipalign: CLIP-style image-text alignment with a hybrid contrastive + masked-token objective.

The project's layers, each importing only the ones below it (``tests/test_layers.py`` walks
every import to prove it):

1. ``clipalign.formats`` -- the common formats: every contract two stages share.
2. ``clipalign`` -- the model library: model, factory, losses, masking, training, evaluation.
3. ``data_prep`` and ``retrieval`` -- the stages.
4. ``clipalign.cli`` -- the ``clipalign`` command, which nothing imports.

The heavy names (``create_model`` and friends) are imported lazily so that
``clipalign --help`` and ``clipalign search`` start fast.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "create_model": "clipalign.factory",
    "create_model_and_transforms": "clipalign.factory",
    "get_tokenizer": "clipalign.factory",
    "list_models": "clipalign.factory",
    "ClipAlign": "clipalign.model",
    "ClipLoss": "clipalign.loss",
    "MlmLoss": "clipalign.loss",
    "SigLipLoss": "clipalign.loss",
    "load_model": "clipalign.checkpoint",
    "mask_tokens": "clipalign.masking",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'clipalign' has no attribute {name!r}")
