"""A loaded index plus what embeds its queries: text or image in, ranked hits out.

Shared by ``clipalign search`` and ``clipalign serve``. Text queries use the index's traced
text tower when it has one (``retrieval.query_encoder``); the full model is built only for
image queries, or when no fast path exists. Model calls run under a lock, so one engine may
serve many threads.
"""
from __future__ import annotations

import io
import os
import threading
from typing import Any, Callable

import numpy as np

from clipalign.formats.folders import IndexFolder
from retrieval.index import SearchIndex, load_index

OVER = {"images": "image", "captions": "caption"}


class QueryEngine:
    """Embeds queries and searches ``index``.

    Args:
        index: a loaded index.
        load_model: builds ``(model, transform, tokenizer)`` and checks it against the index
            (called at most once, on first need).
        text_query: optional fast ``texts -> (Q, D)`` encoder made from the index's own model.
    """

    def __init__(self, index: SearchIndex, load_model: Callable[[], tuple[Any, Callable, Callable]],
                 text_query: Callable[[list[str]], np.ndarray] | None = None):
        self.index = index
        self._load_model, self._text_query = load_model, text_query
        self._full: tuple[Any, Callable, Callable] | None = None
        self._lock = threading.Lock()

    def full_model(self) -> tuple[Any, Callable, Callable]:
        """``(model, transform, tokenizer)``, built on first use."""
        with self._lock:
            if self._full is None:
                self._full = self._load_model()
            return self._full

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """(Q, D) normalised features of ``texts``."""
        if self._text_query is not None:
            with self._lock:
                feats = self._text_query(texts)
        else:
            import torch

            model, _, tokenizer = self.full_model()
            with self._lock, torch.no_grad():
                feats = model.encode_text(tokenizer(texts), normalize=True).float().numpy()
        return feats

    def embed_images(self, images: list[Any]) -> np.ndarray:
        """(Q, D) normalised features of PIL images."""
        import torch

        model, transform, _ = self.full_model()
        batch = torch.stack([transform(im.convert("RGB")) for im in images])
        with self._lock, torch.no_grad():
            return model.encode_image(batch, normalize=True).float().numpy()

    def search_texts(self, texts: list[str], k: int, over: str = "images") -> list[list[dict[str, Any]]]:
        return self.index.search(self.embed_texts(texts), k, target=OVER[over])

    def search_images(self, images: list[Any], k: int, over: str = "images") -> list[list[dict[str, Any]]]:
        return self.index.search(self.embed_images(images), k, target=OVER[over])

    def search_image_bytes(self, data: bytes, k: int, over: str = "images") -> list[list[dict[str, Any]]]:
        """Like ``search_images`` for one encoded image; raises ``ValueError`` if it cannot be decoded."""
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as img:
                image = img.convert("RGB")
        except Exception as exn:  # PIL raises many types for bad bytes
            raise ValueError(f"cannot decode the image ({type(exn).__name__})") from None
        return self.search_images([image], k, over)


def open_engine(folder: str | os.PathLike, checkpoint: str | os.PathLike | None = None,
                mmap: bool | None = None, eager: bool = False) -> QueryEngine:
    """Load an index folder and what embeds its queries, refusing a model that does not match.

    Args:
        checkpoint: query with this model instead of the index's own (always built, and checked).
        eager: build the full model now (a server wants its errors and its cost at start-up).

    Raises:
        FileNotFoundError, ValueError: unreadable folder; ``ModelMismatch`` for a foreign model.
    """
    index = load_index(folder, mmap=mmap)
    layout = IndexFolder(folder)

    def build() -> tuple[Any, Callable, Callable]:
        from clipalign.checkpoint import load_model
        from retrieval.identity import model_identity

        # the folder's own copy (older folders also named it in their info, always as this same file)
        model, transform, tokenizer, meta = load_model(checkpoint or layout.model)
        identity = meta.get("model_identity") or model_identity(meta["model_name"], model.state_dict())
        index.check_model(identity, int(model.clip.visual.output_dim))
        return model, transform, tokenizer

    text_query = None
    fast = index.info.get("text_query")
    if checkpoint is None and fast and layout.text_query.is_file():
        from retrieval.query_encoder import load_text_query

        try:
            text_query = load_text_query(layout.root, fast)
        except Exception:  # a stale or unloadable file: fall back to the full model
            text_query = None
    engine = QueryEngine(index, build, text_query)
    if eager or checkpoint is not None or text_query is None:
        engine.full_model()
    return engine
