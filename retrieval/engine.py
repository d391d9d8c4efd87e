"""A loaded index plus what embeds its queries: text or image in, ranked hits out.

Shared by ``clipalign search`` and ``clipalign serve``, and the one place their bounds live:
``k``, the length of a text query, the pixels of a query image and how many images decode
at once. Text and image queries use the index's ONNX towers through onnxruntime when it has
them (``retrieval.query_encoder``, ``retrieval.image_query``: no torch import); the full model
is built only where no fast path exists (no tower, no onnxruntime). Either way the model is
checked against the index's model identity. Model
calls run under a lock, so one engine may serve many threads, and the texts of concurrent
queries are encoded together (``Batcher``).
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from clipalign.formats.folders import IndexFolder
from retrieval.identity import check_digest
from retrieval.index import FILES, SearchIndex, load_index

if TYPE_CHECKING:  # PIL and the model source are imported for image queries and model builds only
    from clipalign.model_source import ModelSource
    from retrieval.image_query import ImageQuery

OVER = {"images": "image", "captions": "caption"}
MAX_K = 100  # hits a query may ask for
MAX_TEXT = 1000  # characters of a text query
MAX_DECODES = 2  # images decoded at once (one a core here): each may take ~3 bytes a pixel
DECODE_WAIT_S = 2.0  # how long a query image waits for a decode slot before it is turned away
TEXT_BATCH = 256  # texts of one caller (a queries file) embedded and searched together
TEXT_BATCH_MAX = 64  # texts of concurrent callers encoded in one call


class Busy(RuntimeError):
    """Every decode slot stayed taken for the whole wait (a server answers 503)."""


class _Slot:
    def __init__(self, texts: list[str]):
        self.texts, self.done = texts, False
        self.result: np.ndarray | None = None
        self.error: BaseException | None = None


class Batcher:
    """``texts -> (Q, D)`` through ``encode``, with the texts of concurrent callers encoded together.

    No thread of its own: the first caller encodes at once; callers that arrive meanwhile wait,
    and when it is done one of them encodes everything that is waiting (up to ``max_batch``
    texts) in one call. A lone query waits for nothing; under load one forward pass serves many
    (16 queries cost ~4 times one, not 16 times), and the model lock changes hands once per
    batch instead of once per query.
    """

    def __init__(self, encode: Callable[[list[str]], np.ndarray], max_batch: int = 64):
        self._encode, self.max_batch = encode, max_batch
        self._cv = threading.Condition(threading.Lock())
        self._pending: list[_Slot] = []
        self._busy = False

    def __call__(self, texts: list[str]) -> np.ndarray:
        slot = _Slot(texts)
        with self._cv:
            self._pending.append(slot)
            while not slot.done:
                if self._busy:
                    self._cv.wait()
                    continue
                batch, n = [], 0
                while self._pending and (not batch or n + len(self._pending[0].texts) <= self.max_batch):
                    n += len(self._pending[0].texts)
                    batch.append(self._pending.pop(0))
                self._busy = True
                self._cv.release()
                try:
                    self._run(batch)
                finally:
                    self._cv.acquire()
                    self._busy = False
                    self._cv.notify_all()
        if slot.error is not None:
            raise slot.error
        return slot.result

    def _run(self, batch: list[_Slot]) -> None:
        try:
            feats = self._encode([t for s in batch for t in s.texts])
            start = 0
            for s in batch:
                s.result, start = feats[start:start + len(s.texts)], start + len(s.texts)
        except Exception as exn:
            if len(batch) == 1:
                batch[0].error = exn
            else:  # one caller's texts must not fail the others': each alone
                for s in batch:
                    self._run([s])
        finally:
            for s in batch:
                if s.result is None and s.error is None:  # the encoder was interrupted (KeyboardInterrupt)
                    s.error = RuntimeError("the query batch was interrupted")
                s.done = True


def check_k(k: int) -> int:
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k must be between 1 and {MAX_K}")
    return k


def check_texts(texts: list[str]) -> list[str]:
    """The queries, stripped; ``ValueError`` for an empty one or one over ``MAX_TEXT`` characters."""
    stripped = [t.strip() for t in texts]
    if not stripped or not all(stripped):
        raise ValueError("give a non-empty text query")
    if any(len(t) > MAX_TEXT for t in stripped):
        raise ValueError(f"text queries are limited to {MAX_TEXT} characters")
    return stripped


class QueryEngine:
    """Embeds queries and searches ``index``.

    Args:
        index: a loaded index.
        load_model: builds ``(model, transform, tokenizer)`` and checks it against the index
            (called at most once, on first need).
        text_query: optional fast ``texts -> (Q, D)`` encoder made from the index's own model.
        image_query: optional, gives at the first image query the fast image path made from the
            index's own model (``retrieval.image_query.ImageQuery``), or None.
        max_decodes: query images decoded at once; ``max_pixels``: the largest one decoded
            (default ``clipalign.formats.images.DEFAULT_MAX_PIXELS``).
        text_batch: the most texts of concurrent queries encoded in one call (1: each alone).
    """

    def __init__(self, index: SearchIndex, load_model: Callable[[], tuple[Any, Callable, Callable]],
                 text_query: Callable[[list[str]], np.ndarray] | None = None,
                 image_query: Callable[[], ImageQuery | None] | None = None, *,
                 max_decodes: int = MAX_DECODES, max_pixels: int | None = None,
                 decode_wait_s: float = DECODE_WAIT_S, text_batch: int = TEXT_BATCH_MAX):
        self.index = index
        self._load_model, self._text_query, self._image_query = load_model, text_query, image_query
        self._full: tuple[Any, Callable, Callable] | None = None
        self._lock = threading.Lock()
        self._texts = Batcher(self._embed_texts, text_batch)
        self._decodes = threading.BoundedSemaphore(max_decodes)
        self._max_pixels, self.decode_wait_s = max_pixels, decode_wait_s

    @property
    def max_pixels(self) -> int:
        """The most pixels a query image may have; PIL is imported only once an image needs it."""
        if self._max_pixels is None:
            from clipalign.formats.images import DEFAULT_MAX_PIXELS

            self._max_pixels = DEFAULT_MAX_PIXELS
        return self._max_pixels

    @contextlib.contextmanager
    def decode_slot(self, wait_s: float | None = None) -> Iterator[None]:
        """Hold one of the ``max_decodes`` slots while an image is decoded and embedded.

        Raises:
            Busy: no slot came free within ``wait_s`` (default ``decode_wait_s``) seconds.
        """
        if not self._decodes.acquire(timeout=self.decode_wait_s if wait_s is None else wait_s):
            raise Busy("too many images are being decoded at once; try again shortly")
        try:
            yield
        finally:
            self._decodes.release()

    def full_model(self) -> tuple[Any, Callable, Callable]:
        """``(model, transform, tokenizer)``, built on first use."""
        with self._lock:
            if self._full is None:
                self._full = self._load_model()
            return self._full

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """(Q, D) normalised features of ``texts``, encoded together with concurrent callers' (``Batcher``)."""
        return self._texts(texts)

    def _embed_texts(self, texts: list[str]) -> np.ndarray:
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
        fast = self._image_query() if self._image_query is not None else None
        if fast is not None:
            pixels = np.stack([fast.preprocess(im) for im in images])  # outside the lock, as the transform below
            with self._lock:
                return fast.run(pixels)
        import torch

        model, transform, _ = self.full_model()
        batch = torch.stack([transform(im.convert("RGB")) for im in images])
        with self._lock, torch.no_grad():
            return model.encode_image(batch, normalize=True).float().numpy()

    def search_texts(self, texts: list[str], k: int, over: str = "images") -> list[list[dict[str, Any]]]:
        """Hits of each text, ``TEXT_BATCH`` texts at a time; ``ValueError`` for a bad query or ``k``."""
        texts, k = check_texts(texts), check_k(k)
        return [hits for start in range(0, len(texts), TEXT_BATCH)
                for hits in self.index.search(self.embed_texts(texts[start:start + TEXT_BATCH]), k, target=OVER[over])]

    def search_images(self, images: list[Any], k: int, over: str = "images") -> list[list[dict[str, Any]]]:
        k = check_k(k)
        return self.index.search(self.embed_images(images), k, target=OVER[over])

    def search_image_bytes(self, data: bytes, k: int, over: str = "images") -> list[list[dict[str, Any]]]:
        """Like ``search_images`` for one encoded image, its size checked before it is decoded.

        Raises:
            ValueError: a bad ``k``; ``BadSample`` (a ValueError) when the image is undecodable
                or has more than ``max_pixels`` pixels.
            Busy: every decode slot stayed taken.
        """
        from clipalign.formats.images import decode_image

        check_k(k)
        with self.decode_slot():
            image = decode_image(data, "the query image", max_pixels=self.max_pixels)
            return self.search_images([image], k, over)

    def search_image_file(self, path: str | os.PathLike, k: int, over: str = "images") -> list[list[dict[str, Any]]]:
        """``search_image_bytes`` for an image file; ``BadSample`` (a ValueError) also when
        ``path`` is missing or not a regular file."""
        from clipalign.formats.images import read_image

        check_k(k)
        with self.decode_slot():
            image = read_image(path, max_pixels=self.max_pixels)
            return self.search_images([image], k, over)


def _fast_query(index: SearchIndex, layout: IndexFolder, key: str, path: Path,
                load: Callable[[dict[str, Any], bytes], Callable]) -> Callable | None:
    """The folder's ONNX tower of info entry ``key`` (``text_query``, ``image_query``) at ``path``,
    once it is shown to be the file the info records, exported from the index's own model; None
    where the folder has none, an older folder does not record it, or onnxruntime is missing
    (those queries then take the full model, checked like any).

    Raises:
        ValueError: the file is not the one recorded; ``ModelMismatch``: it was exported from another model.
    """
    fast = index.info.get(key)
    recorded = index.info.get(FILES, {}).get(path.name)
    if not fast or recorded is None or not fast.get("model_identity") or not path.is_file():
        return None
    index.check_model(fast["model_identity"], index.dim)
    data = path.read_bytes()
    check_digest(path, recorded, layout.info.name, data=data)
    try:
        return load(fast, data)
    except Exception:  # no onnxruntime, a graph it cannot run, a malformed entry: fall back to the full model
        return None


def open_engine(folder: str | os.PathLike, model: ModelSource | str | os.PathLike | None = None,
                mmap: bool | None = None, eager: bool = False, **limits: Any) -> QueryEngine:
    """Load an index folder and what embeds its queries, refusing a model that does not match.

    Args:
        model: query with this model (a checkpoint or run folder, or pretrained weights) instead
            of the index's own (always built, and checked): the one way to query with weights
            from outside the folder.
        eager: build the full model now (a server wants its errors and its cost at start-up).
        limits: ``max_decodes``, ``max_pixels``, ``decode_wait_s``, ``text_batch`` of the ``QueryEngine``.

    Raises:
        FileNotFoundError, ValueError: unreadable folder, or files other than the info records;
            ``ModelMismatch`` for a foreign model.
    """
    index = load_index(folder, mmap=mmap)
    layout = IndexFolder(folder)

    def build() -> tuple[Any, Callable, Callable]:
        from clipalign.model_source import load_model_source
        from retrieval.identity import model_identity

        if model is None and layout.model.is_file():  # the folder's own copy, the file its info records
            check_digest(layout.model, index.info.get(FILES, {}).get(layout.model.name), layout.info.name)
        built, transform, tokenizer, meta = load_model_source(layout.model if model is None else model)
        # from the weights themselves, never from what the file says of them
        index.check_model(model_identity(meta["model_name"], built.state_dict()), int(built.clip.visual.output_dim))
        return built, transform, tokenizer

    text_query = image_query = None
    if model is None:
        from retrieval.image_query import load_image_query
        from retrieval.query_encoder import load_text_query

        text_query = _fast_query(index, layout, "text_query", layout.text_query,
                                 lambda info, data: load_text_query(layout.root, info, data))
        # opened at the first image query: a text search never reads the image tower
        image_query = functools.cache(lambda: _fast_query(index, layout, "image_query", layout.image_query,
                                                          load_image_query))
    engine = QueryEngine(index, build, text_query, image_query, **limits)
    if eager and image_query is not None:
        image_query()
    if eager or model is not None or text_query is None:
        engine.full_model()
    return engine
