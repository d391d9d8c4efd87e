"""Pre-tokenisation: caption -> ``tok.npy`` bytes the trainer can load instead of tokenising."""
from __future__ import annotations

import io
from functools import lru_cache
from typing import Any, Callable

import numpy as np


@lru_cache(maxsize=4)
def get_tokenizer(model: str) -> Callable[..., Any]:
    """open_clip's tokenizer for ``model``, the project's own configs (``ca-tiny``, ...) included.

    Raises:
        ValueError: for a plain name open_clip does not know (it would fall back to a default tokenizer).
    """
    import open_clip

    import clipalign.factory  # noqa: F401  (registers the project's model configs with open_clip)

    if ":" not in model and open_clip.get_model_config(model) is None:
        raise ValueError(f"unknown model {model!r} (see clipalign.factory.list_models() and open_clip.list_models())")
    return open_clip.get_tokenizer(model)


def context_length(model: str) -> int:
    """The token sequence length of ``model``'s tokenizer."""
    tok = get_tokenizer(model)
    return int(getattr(tok, "context_length", None) or tok(["x"]).shape[-1])


def token_ids(caption: str, model: str) -> np.ndarray:
    """Token ids of one caption: int32, shape ``(context_length,)``."""
    ids = get_tokenizer(model)([caption])
    return np.asarray(ids[0], dtype=np.int32)


def npy_bytes(array: np.ndarray) -> bytes:
    """``np.save`` of ``array`` as bytes (``allow_pickle`` off, so loading needs no trust)."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()
