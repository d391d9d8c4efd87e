"""MoCo-style extra negatives: an EMA copy of the encoders and queues of its past features."""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from clipalign.model import encode_text


class FeatureQueue(nn.Module):
    """A ring buffer of the last ``size`` (D,) features; ``features()`` is the filled part.

    Args:
        size: Q, features kept.
        dim: D.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("buffer", torch.zeros(size, dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.buffer.shape[0]

    def features(self) -> torch.Tensor:
        """(F, D) queued features, F ≤ Q (in buffer order; order does not matter to a loss)."""
        return self.buffer[: int(self.filled)]

    @torch.no_grad()
    def push(self, feats: torch.Tensor) -> None:
        """Add (B, D) features, overwriting the oldest once full."""
        feats = feats.detach().to(self.buffer.dtype)[-self.size :]
        idx = (int(self.ptr) + torch.arange(feats.shape[0])) % self.size
        self.buffer[idx] = feats
        self.ptr.fill_((int(self.ptr) + feats.shape[0]) % self.size)
        self.filled.fill_(min(self.size, int(self.filled) + feats.shape[0]))


class MomentumQueues(nn.Module):
    """An exponential moving average of a ``ClipAlign``'s encoders and queues of its features.

    After every optimizer step call ``update(model)``; then ``push(images, texts)`` encodes
    the step's batch with the averaged encoders and queues the features, which later steps
    use as extra negatives (``QueueClipLoss``). With ``momentum == 0`` the average *is* the
    model, so ``push_features`` queues the step's own (detached) features and skips the
    extra forward pass: a plain memory bank.

    Args:
        model: the online ``ClipAlign`` (its MLM head is not copied).
        size: queue length Q.
        dim: embedding dimension D.
        momentum: m in ``ema = m * ema + (1 - m) * online``.
    """

    def __init__(self, model: nn.Module, size: int, dim: int, momentum: float = 0.995):
        super().__init__()
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.ema = copy.deepcopy(model.clip).requires_grad_(False).eval() if momentum > 0 else None
        self.image_queue = FeatureQueue(size, dim)
        self.text_queue = FeatureQueue(size, dim)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the averaged weights towards ``model.clip``'s."""
        if self.ema is None:
            return
        online = dict(model.clip.named_parameters())
        for name, p in self.ema.named_parameters():
            p.lerp_(online[name].detach(), 1 - self.momentum)
        for (name, b), (_, ob) in zip(self.ema.named_buffers(), model.clip.named_buffers()):
            b.copy_(ob)

    @torch.no_grad()
    def push(self, images: torch.Tensor, texts: torch.Tensor) -> None:
        """Encode (B, 3, H, W) images and (B, L) texts with the averaged encoders and queue them."""
        assert self.ema is not None, "momentum 0 queues the step's own features (push_features)"
        self.push_features(self.ema.encode_image(images, normalize=True), encode_text(self.ema, texts, normalize=True))

    def push_features(self, image_features: torch.Tensor, text_features: torch.Tensor) -> None:
        self.image_queue.push(image_features.float())
        self.text_queue.push(text_features.float())

    def queued(self) -> dict[str, Any]:
        """``{"image_queue": (F, D), "text_queue": (F, D)}`` for ``QueueClipLoss``."""
        return {"image_queue": self.image_queue.features(), "text_queue": self.text_queue.features()}
