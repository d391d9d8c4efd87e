"""Pre-tokenisation: caption -> ``tok.npy`` bytes the trainer can load instead of tokenising."""
from __future__ import annotations

import io
from typing import Any, Callable

import numpy as np


def _tokenizer(model: str) -> Callable[..., Any]:
    from clipalign.factory import get_tokenizer  # on first use: prep's main process stays free of torch

    return get_tokenizer(model)


def context_length(model: str) -> int:
    """The token sequence length of ``model``'s tokenizer."""
    tok = _tokenizer(model)
    return int(getattr(tok, "context_length", None) or tok(["x"]).shape[-1])


def token_ids(caption: str, model: str) -> np.ndarray:
    """Token ids of one caption: int32, shape ``(context_length,)``."""
    ids = _tokenizer(model)([caption])
    return np.asarray(ids[0], dtype=np.int32)


def npy_bytes(array: np.ndarray) -> bytes:
    """``np.save`` of ``array`` as bytes (``allow_pickle`` off, so loading needs no trust)."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()
