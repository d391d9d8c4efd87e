"""Embed a shard collection: image features, caption features and one metadata row per image."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from clipalign.data import SkipCounter
from clipalign.embedding import decoded, image_features, iter_shard_samples, text_features
from clipalign.model import ClipAlign


@dataclass
class Embedded:
    """Features of a collection, row i of each array describing ``metadata[i]``."""

    image: torch.Tensor  # (N, D) normalised
    caption: torch.Tensor  # (N, D) normalised
    metadata: list[dict[str, Any]]
    skipped: dict[str, int] = field(default_factory=dict)


def _metadata(sample: dict[str, Any]) -> dict[str, Any]:
    info = json.loads(sample["json"]) if "json" in sample else {}
    return {
        "key": sample["__key__"],
        "caption": sample.get("txt", b"").decode("utf-8").strip(),
        "source": info.get("source", ""),
        "shard": sample.get("__url__", ""),
    }


def embed_shards(
    model: ClipAlign,
    transform: Callable,
    tokenizer: Callable,
    shards: list[str],
    *,
    batch_size: int = 256,
    precision: str = "fp32",
    progress: Callable[..., Any] | None = None,
) -> Embedded:
    """Embed every decodable image of ``shards`` and its caption, in shard order."""
    counter = SkipCounter()
    items = decoded(iter_shard_samples(shards, counter), counter, _metadata)
    images, metadata = image_features(model, transform, items, batch_size=batch_size, precision=precision, progress=progress)
    captions = [m["caption"] for m in metadata]
    caption_feats = text_features(model, tokenizer, captions, precision=precision) if captions else torch.empty_like(images)
    return Embedded(images, caption_feats, metadata, dict(counter.counts))
