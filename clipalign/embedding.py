"""Batched inference: shard samples → images → features, and texts → features."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import webdataset as wds
from PIL import Image

from clipalign.formats.images import read_image
from clipalign.formats.sample import sample_image
from clipalign.formats.skips import SkipCounter
from clipalign.model import ClipAlign
from clipalign.precision import autocast, model_device


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


def open_images(items: Iterable[tuple[Path, Any]], counter: SkipCounter) -> Iterator[tuple[Image.Image, Any]]:
    """``(RGB image, payload)`` for each readable ``(path, payload)``; a missing or undecodable
    file is counted in ``counter``, never fatal."""
    for path, payload in items:
        try:
            image = read_image(path)
        except Exception as exn:
            counter(exn)
        else:
            yield image, payload


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
    """Normalised features of ``(image, payload)`` items.

    Args:
        progress: a tqdm-like factory; its bar counts the images.
        on_batch: called with the size of each batch once it is embedded (e.g. to count
            progress, or to stop a run between batches).

    Returns:
        ``(features (N, D) float32, payloads)`` in input order.
    """
    feats, payloads, batch = [], [], []
    bar = progress(unit="img") if progress else None

    device = model_device(model)

    def flush() -> None:
        with autocast(precision, device.type):
            f = model.encode_image(torch.stack(batch).to(device), normalize=True)
        feats.append(f.float().cpu())
        if bar is not None:
            bar.update(len(batch))
        if on_batch is not None:
            on_batch(len(batch))
        batch.clear()

    for image, payload in items:
        batch.append(transform(image))
        payloads.append(payload)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if bar is not None:
        bar.close()
    dim = model.clip.visual.output_dim if not feats else feats[0].shape[1]
    return (torch.cat(feats) if feats else torch.empty(0, dim)), payloads


@torch.no_grad()
def text_features(
    model: ClipAlign,
    tokenizer: Callable,
    texts: list[str],
    *,
    batch_size: int = 512,
    precision: str = "fp32",
) -> torch.Tensor:
    """Normalised features of ``texts``: (N, D) float32."""
    if not texts:
        raise ValueError("no texts to embed")
    out, device = [], model_device(model)
    for start in range(0, len(texts), batch_size):
        with autocast(precision, device.type):
            ids = tokenizer(texts[start : start + batch_size]).to(device)
            out.append(model.encode_text(ids, normalize=True).float().cpu())
    return torch.cat(out)
