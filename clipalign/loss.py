"""Losses: each a small module that returns a dict of named, already-weighted losses.

The training step sums every ``*_loss`` entry of every loss module it uses.
"""
from __future__ import annotations

import open_clip
import torch
import torch.nn.functional as F
from torch import nn


class ClipLoss(open_clip.loss.ClipLoss):
    """Symmetric InfoNCE (CLIP): cross-entropy over image→text and text→image similarities.

    open_clip's implementation, with its gather of features across ranks (gradients kept,
    labels offset by rank), returning a named loss.

    Args:
        rank: this process's rank.
        world_size: number of processes whose batches form the negatives.

    Shape:
        image_features: (B, D), L2-normalised.
        text_features: (B, D), L2-normalised; row i is the caption of image i.
        logit_scale: scalar, the exponentiated learnable inverse temperature.
    """

    def __init__(self, rank: int = 0, world_size: int = 1):
        super().__init__(gather_with_grad=True, cache_labels=True, rank=rank, world_size=world_size)

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        return super().forward(image_features, text_features, logit_scale, output_dict=True)


class SigLipLoss(open_clip.loss.SigLipLoss):
    """Sigmoid loss (SigLIP): every image-text pair is an independent binary decision.

    open_clip's implementation, returning a named loss. The model needs a learnable
    ``logit_bias`` (``create_model(..., init_logit_bias=-10)``).

    Shape:
        image_features, text_features: (B, D), L2-normalised.
        logit_scale: scalar (exponentiated); logit_bias: scalar.
    """

    def __init__(self, rank: int = 0, world_size: int = 1):
        super().__init__(rank=rank, world_size=world_size)

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
        logit_bias: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        return super().forward(image_features, text_features, logit_scale, logit_bias, output_dict=True)


class MlmLoss(nn.Module):
    """Masked-token cross-entropy, scaled by ``weight``.

    Args:
        weight: multiplier of the cross-entropy in the total loss.

    Shape:
        logits: (M, V), computed at the M masked positions only.
        targets: (M,) original token ids.
    """

    def __init__(self, weight: float = 0.1):
        super().__init__()
        self.weight = weight

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mlm_loss": self.weight * F.cross_entropy(logits.float(), targets)}


def mlm_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of masked positions whose top-1 prediction is the original token."""
    if targets.numel() == 0:
        return float("nan")
    return (logits.argmax(dim=-1) == targets).float().mean().item()
