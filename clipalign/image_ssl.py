"""Image self-supervision beside the contrastive loss: SimCLR on two augmented views (SLIP);
MAE's masked-patch reconstruction lives in ``clipalign.mae``.

The two views use crops, flips and brightness/contrast jitter; hue and saturation are left
alone, because colour is part of what captions describe ("a red square").
"""
from __future__ import annotations

from typing import Callable

import open_clip
import torch
from torch import nn
from torchvision import transforms as T

IMAGE_SSL = ("none", "simclr", "mae")  # none: off; mae: clipalign.mae, on the patches patch dropout hides


def simclr_view_transform(image_size: int, mean: tuple[float, ...] | None = None,
                          std: tuple[float, ...] | None = None) -> Callable:
    """PIL image → (3, S, S) tensor: one random SimCLR-style view."""
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=(0.3, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4)], p=0.8),
        T.ToTensor(),
        T.Normalize(mean or open_clip.OPENAI_DATASET_MEAN, std or open_clip.OPENAI_DATASET_STD),
    ])


class ProjectionHead(nn.Module):
    """SimCLR's projection MLP on the image embedding: (B, D) → (B, out) L2-normalised."""

    def __init__(self, dim: int, hidden: int = 512, out: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.net(x), dim=-1)
