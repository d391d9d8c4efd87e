"""A fast path for text queries: the text tower traced to TorchScript, and open_clip's BPE
tokenizer loaded on its own, so a text search never imports open_clip (≈2.6 s of a cold start,
most of it torchvision importing ``torch._dynamo``).

``export_text_query`` writes it at index time only when the traced tower and the standalone
tokenizer reproduce the model exactly on sample texts; otherwise (another tokenizer, a tower
that does not trace) there is no file and queries take the full model path. The folder's
info records the identity of the model it was traced from and the file's sha256, both
checked before it answers a query (``retrieval.engine``).
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


def export_text_query(model: Any, tokenizer: Callable, folder: str | os.PathLike,
                      identity: dict[str, str] | None = None) -> dict[str, Any] | None:
    """Trace ``model.encode_text(·, normalize=True)`` into the index folder ``folder``.

    Args:
        identity: the model's identity (``retrieval.identity.model_identity``), recorded with the tower.

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
    entry = {"file": path.name, "tokenizer": "SimpleTokenizer", "context_length": int(tokenizer.context_length)}
    return entry | ({"model_identity": dict(identity)} if identity else {})


def load_text_query(folder: str | os.PathLike, info: dict[str, Any], data: bytes | None = None
                    ) -> Callable[[list[str]], np.ndarray]:
    """``texts -> (Q, D)`` normalised features from the files ``export_text_query`` wrote.

    ``info`` is the folder's ``text_query`` entry; the tower is read from the layout's own
    file (or from ``data``, its bytes already read and checked), never from a path the info names.
    """
    import io

    import torch

    tokenizer = _tokenizer_module().SimpleTokenizer(context_length=int(info["context_length"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = io.BytesIO(data) if data is not None else str(IndexFolder(folder).text_query)
        tower = _jit().load(source, map_location="cpu")

    def encode(texts: list[str]) -> np.ndarray:
        with torch.no_grad():
            return tower(tokenizer(texts)).float().numpy()

    return encode


def export_text_query_of(checkpoint: str | os.PathLike, folder: str | os.PathLike
                         ) -> tuple[dict[str, Any] | None, dict[str, str]]:
    """``export_text_query`` for the model of ``checkpoint`` (an index folder's own model copy).

    Returns:
        ``(the text_query entry or None, the model's identity, computed from its weights)``.
    """
    from clipalign.model_source import load_model_source
    from retrieval.identity import model_identity

    model, _, tokenizer, meta = load_model_source(checkpoint)
    identity = model_identity(meta["model_name"], model.state_dict())
    return export_text_query(model, tokenizer, folder, identity), identity
