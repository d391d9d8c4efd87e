"""A fast path for text queries: the text tower traced to TorchScript, and open_clip's BPE
tokenizer loaded on its own, so a text search never imports open_clip (≈2.6 s of a cold start,
most of it torchvision importing ``torch._dynamo``).

``export_text_query`` writes it at index time only when the traced tower and the standalone
tokenizer reproduce the model exactly on sample texts; otherwise (another tokenizer, a tower
that does not trace) there is no file and queries take the full model path.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from clipalign.formats.folders import IndexFolder

_SAMPLES = ["a red circle", "A LARGE green star at the bottom-right!", "x", "ünïcödé  text", "", "a " * 40]


def _tokenizer_module() -> Any:
    """open_clip's ``tokenizer.py`` as a module of its own, without importing the open_clip package."""
    name = "_clipalign_open_clip_tokenizer"
    if name not in sys.modules:
        package = importlib.util.find_spec("open_clip")  # locates, does not import
        path = Path(package.submodule_search_locations[0]) / "tokenizer.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def _jit() -> Any:
    import torch

    return torch.jit


def export_text_query(model: Any, tokenizer: Callable, folder: str | os.PathLike) -> dict[str, Any] | None:
    """Trace ``model.encode_text(·, normalize=True)`` into the index folder ``folder``.

    Returns:
        The ``text_query`` entry of the folder's info, or None (no fast path for this model).
    """
    import torch

    from clipalign.formats.atomic import replace_file

    if type(tokenizer).__name__ != "SimpleTokenizer":
        return None
    path = IndexFolder(folder).text_query

    class TextTower(torch.nn.Module):
        def __init__(self, model: Any):
            super().__init__()
            self.model = model

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.model.encode_text(tokens, normalize=True)

    try:
        standalone = _tokenizer_module().SimpleTokenizer(context_length=tokenizer.context_length)
        if not torch.equal(standalone(_SAMPLES), tokenizer(_SAMPLES)):
            return None
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TorchScript's deprecation notices
            traced = _jit().trace(TextTower(model).eval(), tokenizer(_SAMPLES[:2]), check_trace=False)
            for batch in (_SAMPLES[:1], _SAMPLES):  # other batch sizes than the traced one
                want = model.encode_text(tokenizer(batch), normalize=True)
                if not torch.allclose(traced(tokenizer(batch)), want, atol=1e-5):
                    return None
            replace_file(path, lambda tmp: _jit().save(traced, str(tmp)))
    except Exception:  # any failure means: no fast path, never a wrong one
        return None
    return {"file": path.name, "tokenizer": "SimpleTokenizer", "context_length": int(tokenizer.context_length)}


def load_text_query(folder: str | os.PathLike, info: dict[str, Any]) -> Callable[[list[str]], np.ndarray]:
    """``texts -> (Q, D)`` normalised features from the files ``export_text_query`` wrote.

    ``info`` is the folder's ``text_query`` entry; the tower is read from the layout's own
    file, never from a path the info names.
    """
    import torch

    tokenizer = _tokenizer_module().SimpleTokenizer(context_length=info["context_length"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tower = _jit().load(str(IndexFolder(folder).text_query), map_location="cpu")

    def encode(texts: list[str]) -> np.ndarray:
        with torch.no_grad():
            return tower(tokenizer(texts)).float().numpy()

    return encode


def export_text_query_of(checkpoint: str | os.PathLike, folder: str | os.PathLike) -> dict[str, Any] | None:
    """``export_text_query`` for the model of ``checkpoint`` (an index folder's own model copy)."""
    from clipalign.checkpoint import load_model

    model, _, tokenizer, _ = load_model(checkpoint)
    return export_text_query(model, tokenizer, folder)
