"""Batched inference: shard samples → images → features, and texts → features."""
from __future__ import annotations

import math
import queue
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import webdataset as wds
from PIL import Image
from torchvision import transforms as T

from clipalign.formats.images import Draft, read_image
from clipalign.formats.sample import sample_image
from clipalign.formats.skips import SkipCounter
from clipalign.inference import image_encoder
from clipalign.model import ClipAlign, text_length, token_lengths
from clipalign.pixels import uint8_transform
from clipalign.precision import autocast, model_device, resolve_precision


def iter_shard_samples(shards: list[str], counter: SkipCounter) -> Iterator[dict[str, Any]]:
    """Raw samples of the shards, in order, once; a truncated shard is counted and skipped."""
    pipeline = wds.DataPipeline(wds.SimpleShardList(shards), wds.tarfile_to_samples(handler=counter))
    yield from pipeline


def decoded(
    samples: Iterable[dict[str, Any]], counter: SkipCounter, parse: Callable[[dict[str, Any]], Any]
) -> Iterator[tuple[Image.Image, Any]]:
    """``(image, parse(sample))`` for each good sample; bad ones are counted in ``counter``."""
    for sample in samples:
        try:
            yield sample_image(sample), parse(sample)
        except Exception as exn:
            counter(exn)


DRAFT_GAP = 2.0  # a draft-decoded JPEG keeps at least this many times the size the transform resizes it to


def jpeg_draft(transform: Callable, gap: float = DRAFT_GAP) -> Draft | None:
    """How small a JPEG may be decoded for ``transform`` (``clipalign.formats.images.Draft``), or
    ``None`` where it must be decoded whole.

    Only a ``Compose`` that starts with a plain ``Resize`` (open_clip's eval transforms: the short
    side to S, or both sides) gets one: the JPEG is decoded at the smallest of 1/2, 1/4 and 1/8
    of its size that keeps ``gap`` times what the resize makes, and the resize shrinks it from
    there. The images differ from a whole decode's by what that first shrink rounds (with ``gap``
    2, under half a grey level on average; ``tests/test_embedding_draft.py``), as with PIL's own
    ``reducing_gap``.
    """
    steps = transform.transforms if isinstance(transform, T.Compose) else []
    if not steps or type(steps[0]) is not T.Resize or steps[0].max_size is not None:
        return None
    size = steps[0].size
    if isinstance(size, int) or len(size) == 1:  # the short side to S
        short = size if isinstance(size, int) else size[0]

        def least(stored: tuple[int, int]) -> tuple[int, int] | None:
            scale = gap * short / min(stored)
            return None if scale >= 1 else (math.ceil(stored[0] * scale), math.ceil(stored[1] * scale))
    else:  # (height, width): both sides
        height, width = size

        def least(stored: tuple[int, int]) -> tuple[int, int] | None:
            want = (min(stored[0], math.ceil(gap * width)), min(stored[1], math.ceil(gap * height)))
            return None if want == tuple(stored) else want
    return least


def open_images(items: Iterable[tuple[Path, Any]], counter: SkipCounter, draft: Draft | None = None
                ) -> Iterator[tuple[Image.Image, Any]]:
    """``(RGB image, payload)`` for each readable ``(path, payload)``; a missing or undecodable
    file is counted in ``counter``, never fatal. ``draft``: how small a JPEG may be decoded
    (``jpeg_draft``)."""
    for path, payload in items:
        try:
            image = read_image(path, draft=draft)
        except Exception as exn:
            counter(exn)
        else:
            yield image, payload


def prefetched_batches(items: Iterable[tuple[Image.Image, Any]], transform: Callable, batch_size: int,
                       depth: int = 2) -> Iterator[tuple[torch.Tensor, list[Any]]]:
    """``(images (B, 3, H, W), payloads)`` batches of transformed ``items``, made ahead in a thread.

    Reading, decoding and resizing (PIL and torch release the GIL for them) overlap the model's
    pass over the batch before, instead of leaving the matrix units idle between batches.
    Order is kept; an exception raised while making a batch is raised here, at that batch.
    """
    done = object()
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def make() -> None:
        try:
            images, payloads = [], []
            for image, payload in items:
                images.append(transform(image))
                payloads.append(payload)
                if len(images) == batch_size:
                    ready.put((torch.stack(images), payloads))
                    images, payloads = [], []
                if stop.is_set():
                    return
            if images:
                ready.put((torch.stack(images), payloads))
            ready.put(done)
        except BaseException as exn:  # handed to the consumer, raised in its thread
            ready.put(exn)

    worker = threading.Thread(target=make, name="clipalign-prefetch", daemon=True)
    worker.start()
    try:
        while (got := ready.get()) is not done:
            if isinstance(got, BaseException):
                raise got
            yield got
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            try:
                ready.get(timeout=0.1)
            except queue.Empty:
                pass
        worker.join()


@torch.no_grad()
def image_features(
    model: ClipAlign,
    transform: Callable,
    items: Iterable[tuple[Image.Image, Any]],
    *,
    batch_size: int = 256,
    precision: str = "fp32",
    progress: Callable[..., Any] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, list[Any]]:
    """Normalised features of ``(image, payload)`` items (batches made ahead: ``prefetched_batches``;
    the image tower's batch norms folded: ``clipalign.inference.image_encoder``; ``transform``'s
    ``ToTensor`` and ``Normalize`` run on the whole batch: ``clipalign.pixels.uint8_transform``).

    Args:
        precision: ``fp32``, ``bf16``, or ``auto`` (``clipalign.precision.resolve_precision``).
        progress: a tqdm-like factory; its bar counts the images.
        on_batch: called with the size of each batch once it is embedded (e.g. to count
            progress, or to stop a run between batches).

    Returns:
        ``(features (N, D) float32, payloads)`` in input order.
    """
    feats, payloads = [], []
    bar = progress(unit="img") if progress else None
    device = model_device(model)
    precision = resolve_precision(precision, device.type)
    encode = image_encoder(model)  # batch norms folded where the tower has them
    pixels, normalize = uint8_transform(transform)  # the thread stops at uint8; the batch is normalised here
    try:
        for images, batch_payloads in prefetched_batches(items, pixels, batch_size):
            if normalize is not None:
                images = normalize(images)
            with autocast(precision, device.type):
                feats.append(encode(images.to(device)).float().cpu())
            payloads.extend(batch_payloads)
            if bar is not None:
                bar.update(len(images))
            if on_batch is not None:
                on_batch(len(images))
    finally:
        if bar is not None:
            bar.close()
    dim = model.clip.visual.output_dim if not feats else feats[0].shape[1]
    return (torch.cat(feats) if feats else torch.empty(0, dim)), payloads


TEXT_WINDOW = 16  # batches of texts tokenised and sorted together: bounds the ids held at once


@torch.no_grad()
def text_features(
    model: ClipAlign,
    tokenizer: Callable,
    texts: list[str],
    *,
    batch_size: int = 512,
    precision: str = "fp32",
) -> torch.Tensor:
    """Normalised features of ``texts``: (N, D) float32, in input order.

    Where the text tower allows it (``ClipAlign.trims_text``: CLIP's causal tower), texts are
    embedded shortest first, a window of ``TEXT_WINDOW`` batches at a time, and each batch
    is cut to its longest text (``text_length``): the same features without the padding's
    FLOPs (a demo caption is ~12 of the context's 32 tokens).
    """
    if not texts:
        raise ValueError("no texts to embed")
    device = model_device(model)
    precision = resolve_precision(precision, device.type)
    trims = bool(getattr(model, "trims_text", False))
    out: torch.Tensor | None = None
    for window in range(0, len(texts), batch_size * TEXT_WINDOW):
        ids = tokenizer(texts[window : window + batch_size * TEXT_WINDOW])  # (W, L)
        # shortest first, ties in input order
        order = torch.argsort(token_lengths(ids, model.eot_id), stable=True) if trims else torch.arange(len(ids))
        for start in range(0, len(ids), batch_size):
            rows = order[start : start + batch_size]
            batch = ids[rows]
            if trims:
                batch = batch[:, : text_length(batch, model.eot_id)]
            with autocast(precision, device.type):
                feats = model.encode_text(batch.to(device), normalize=True).float().cpu()
            if out is None:
                out = torch.empty(len(texts), feats.shape[1])
            out[window + rows] = feats
    return out
