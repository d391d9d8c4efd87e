"""Learning-rate schedule: linear warmup, then cosine decay to zero."""
from __future__ import annotations

import math

import torch


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def warmup_cosine_scheduler(
    optimizer: torch.optim.Optimizer, warmup: int, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following ``warmup_cosine``; its state dict restores the step count."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total))
