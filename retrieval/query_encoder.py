"""A fast path for text queries: the text tower as ONNX, run by onnxruntime, and open_clip's BPE
tokenizer run without torch, so a text search imports neither torch (≈1.4 s of a cold start)
nor open_clip (≈1 s more).

``export_text_query`` writes the tower at index time with the one ONNX exporter
(``clipalign.export_onnx.export_tower``), and keeps it only when the torch-free tokenizer gives
the model tokenizer's ids and onnxruntime reproduces the model within ``TOLERANCE`` on sample
texts, one at a time and together; otherwise (another tokenizer, a tower that does not export,
no onnxruntime) there is no file and queries take the full model path. The folder's info
records the identity of the model it came from and the file's sha256, both checked before it
answers a query (``retrieval.engine``).
"""
from __future__ import annotations

import builtins
import importlib.util
import logging
import os
import sys
import tempfile
import types
from pathlib import Path
from typing import Any, Callable

import numpy as np

from clipalign.formats.folders import IndexFolder

log = logging.getLogger(__name__)

TOKENIZER = "SimpleTokenizer"  # the one tokenizer kind with a torch-free twin (open_clip's CLIP BPE)
TOLERANCE = 1e-5  # max abs difference from the torch model's normalised features
_SAMPLES = ["a red circle", "A LARGE green star at the bottom-right!", "x", "ünïcödé  text", "", "a " * 40,
            "&amp; caf\u00e9 \u2014 \U0001f600 ｆｕｌｌ-width, 日本語 and 'quotes' it's"]


class _Unavailable:
    """What the stand-in answers for any other torch name: fine in an annotation, an error when called."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"torch.{self.name} is not available to the torch-free tokenizer")


class _NumpyTorch(types.ModuleType):
    """The few torch calls ``SimpleTokenizer.__call__`` makes, in numpy: its ids come back int64 arrays."""

    long = np.int64
    tensor = staticmethod(np.asarray)

    @staticmethod
    def zeros(*shape: int, dtype: Any = None) -> np.ndarray:
        return np.zeros(shape, np.int64)

    def __getattr__(self, name: str) -> Any:
        return _Unavailable(name)


def _tokenizer_module() -> Any:
    """open_clip's ``tokenizer.py`` as a module of its own, never importing the open_clip package,
    with its ``import torch`` answered by ``_NumpyTorch``: open_clip's own BPE code, without torch.

    The stand-in is seen by that module alone (its ``__import__``); ``sys.modules`` is untouched.
    """
    name = "_clipalign_open_clip_tokenizer"
    if name not in sys.modules:
        stand_in = _NumpyTorch("torch")

        def import_(what: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0) -> Any:
            if level == 0 and (what == "torch" or what.startswith("torch.")):
                return stand_in
            return builtins.__import__(what, globals, locals, fromlist, level)

        package = importlib.util.find_spec("open_clip")  # locates, does not import
        path = Path(package.submodule_search_locations[0]) / "tokenizer.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        module.__dict__["__builtins__"] = {**vars(builtins), "__import__": import_}
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def tokenize(texts: list[str], context_length: int) -> np.ndarray:
    """(Q, context_length) int64 ids of ``texts``, as open_clip's default ``SimpleTokenizer`` gives them."""
    return _tokenizer_module()._tokenizer(list(texts), context_length=context_length)


def _same_kind(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` is the default ``SimpleTokenizer`` (vocabulary, cleaning, no reduction)."""
    standalone = _tokenizer_module()._tokenizer
    return (type(tokenizer).__name__ == TOKENIZER and getattr(tokenizer, "reduction_fn", None) is None
            and getattr(tokenizer, "encoder", None) == standalone.encoder
            and getattr(tokenizer.clean_fn, "__name__", None) == standalone.clean_fn.__name__)


def onnx_session(model: bytes) -> Any:
    """An onnxruntime CPU session over the graph ``model``; the one way both sides open it."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: no notes on the graph's unused initializers
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _encoder(session: Any, context_length: int) -> Callable[[list[str]], np.ndarray]:
    """``texts -> (Q, D)`` float32 features through ``session``, the tokenizer loaded now, not at the first query."""
    _tokenizer_module()
    name = session.get_inputs()[0].name  # the exporter's; read from the graph, not restated

    def encode(texts: list[str]) -> np.ndarray:
        return np.asarray(session.run(None, {name: tokenize(texts, context_length)})[0], dtype=np.float32)

    return encode


def keep_if_reproduced(model: Any, tower: str, example: Any, path: Path,
                       encoder: Callable[[bytes], Callable[[list[Any]], np.ndarray]],
                       reference: Callable[[list[Any]], Any], batches: tuple[list[Any], ...]) -> bool:
    """Export ``model``'s ``tower`` (traced on the tensor ``example``) and write it at ``path`` only
    if ``encoder(graph bytes)`` gives ``reference``'s torch features within ``TOLERANCE`` on every
    one of ``batches`` (other sizes than the traced one); True if it was written."""
    import torch

    from clipalign.export_onnx import export_tower
    from clipalign.formats.atomic import replace_file

    with tempfile.TemporaryDirectory(prefix="clipalign-onnx-") as tmp:
        # unoptimized: 1.4 s less of an index build, and the same query latency once onnxruntime
        # has optimized it at load (demo model, AVX2 EPYC: 0.80 against 1.04 ms a text query)
        export_tower(model, tower, example, Path(tmp) / f"{tower}.onnx", optimize=False)
        data = (Path(tmp) / f"{tower}.onnx").read_bytes()
    encode = encoder(data)
    for batch in batches:
        with torch.no_grad():
            want = reference(batch).float().numpy()
        error = float(np.abs(encode(batch) - want).max())
        if not error <= TOLERANCE:
            log.info("the ONNX %s tower misses the model by %g (over %g) on %d inputs: not kept", tower, error,
                     TOLERANCE, len(batch))
            return False
    replace_file(path, lambda tmp: Path(tmp).write_bytes(data))
    return True


def export_text_query(model: Any, tokenizer: Callable, folder: str | os.PathLike,
                      identity: dict[str, str] | None = None) -> dict[str, Any] | None:
    """Write ``model.encode_text(·, normalize=True)`` as ONNX into the index folder ``folder``.

    Args:
        identity: the model's identity (``retrieval.identity.model_identity``), recorded with the tower.

    Returns:
        The ``text_query`` entry of the folder's info, or None (no fast path for this model).
    """
    try:
        import torch

        if not _same_kind(tokenizer):
            log.info("no ONNX text tower: the tokenizer is not open_clip's SimpleTokenizer")
            return None
        context = int(tokenizer.context_length)
        ids = tokenize(_SAMPLES, context)
        if not np.array_equal(ids, tokenizer(_SAMPLES).numpy()):
            log.info("no ONNX text tower: the torch-free tokenizer does not reproduce the model's")
            return None
        path = IndexFolder(folder).text_query
        if not keep_if_reproduced(model, "text", torch.from_numpy(ids[:2]), path,
                                  lambda data: _encoder(onnx_session(data), context),
                                  lambda batch: model.encode_text(tokenizer(batch), normalize=True),
                                  (_SAMPLES[:1], _SAMPLES)):
            return None
    except Exception as err:  # any failure means: no fast path, never a wrong one
        log.info("no ONNX text tower: %s: %s", type(err).__name__, err)
        return None
    entry = {"file": path.name, "tokenizer": TOKENIZER, "context_length": context}
    return entry | ({"model_identity": dict(identity)} if identity else {})


def load_text_query(folder: str | os.PathLike, info: dict[str, Any], data: bytes | None = None
                    ) -> Callable[[list[str]], np.ndarray]:
    """``texts -> (Q, D)`` normalised features from the file ``export_text_query`` wrote.

    ``info`` is the folder's ``text_query`` entry; the tower is read from the layout's own
    file (or from ``data``, its bytes already read and checked), never from a path the info names.

    Raises:
        ImportError: no onnxruntime (or open_clip's tokenizer is missing); ValueError: another tokenizer kind.
    """
    if info.get("tokenizer") != TOKENIZER:
        raise ValueError(f"no torch-free tokenizer of kind {info.get('tokenizer')!r}")
    session = onnx_session(data if data is not None else IndexFolder(folder).text_query.read_bytes())
    return _encoder(session, int(info["context_length"]))
