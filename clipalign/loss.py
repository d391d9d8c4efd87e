"""Losses: each a small module that returns a dict of named, already-weighted losses.

The training step sums every ``*_loss`` entry of every loss module it uses.

The contrastive losses score their similarities in fp32 whatever the autocast, so that the loss
is the fp32 loss of the features it is given: a bf16 logit near CLIP's scale (about 14-100) is
rounded to steps of 0.06-0.5. The matmul is (B, D) x (D, B), a negligible share of a step; what
it changed in held-out quality, little (BENCHMARKS.md, "The demo's recipe", 2026-12-04).
"""
from __future__ import annotations

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from clipalign.masking import IGNORE_INDEX


def _autocast_off(t: torch.Tensor) -> torch.autocast:
    """Autocast off on ``t``'s device: the math inside runs in the dtypes it is given."""
    return torch.autocast(t.device.type, enabled=False)


class ClipLoss(open_clip.loss.ClipLoss):
    """Symmetric InfoNCE (CLIP): cross-entropy over image→text and text→image similarities.

    open_clip's implementation, with its gather of features across ranks (gradients kept,
    labels offset by rank), returning a named loss; logits in fp32.

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
        with _autocast_off(image_features):
            return super().forward(
                image_features.float(), text_features.float(), logit_scale.float(), output_dict=True)


class SigLipLoss(open_clip.loss.SigLipLoss):
    """Sigmoid loss (SigLIP): every image-text pair is an independent binary decision.

    open_clip's implementation, returning a named loss; logits in fp32. The model needs a learnable
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
        with _autocast_off(image_features):
            return super().forward(image_features.float(), text_features.float(), logit_scale.float(),
                                   logit_bias.float(), output_dict=True)


class MlmLoss(nn.Module):
    """Masked-token cross-entropy, scaled by ``weight``.

    Args:
        weight: multiplier of the cross-entropy in the total loss.

    Shape:
        logits: (M, V), computed at the M masked positions only.
        targets: (M,) original token ids.
        num_targets: divide the summed cross-entropy by this instead of M. A step that
            splits its masked tokens over micro-batches or ranks passes the whole step's count
            (times the world size, whose gradients are averaged), so the sum of its parts is
            the plain mean over all of them.
    """

    def __init__(self, weight: float = 0.1):
        super().__init__()
        self.weight = weight

    def forward(
        self, logits: torch.Tensor, targets: torch.Tensor, num_targets: float | None = None
    ) -> dict[str, torch.Tensor]:
        if num_targets is None:
            return {"mlm_loss": self.weight * F.cross_entropy(logits.float(), targets)}
        summed = F.cross_entropy(logits.float(), targets, reduction="sum")
        return {"mlm_loss": self.weight * summed / num_targets}


class QueueClipLoss(nn.Module):
    """Symmetric InfoNCE whose negatives are the batch plus a queue of past features (MoCo).

    Image i is scored against every caption of the batch and every queued caption feature,
    and caption i against every image of the batch and every queued image feature; the
    positive is the pair's own online feature. With empty queues it is CLIP's loss. On
    several ranks the batch part is gathered from all of them (gradients kept); the queues
    are each rank's own. Logits in fp32.

    Shape:
        image_features, text_features: (B, D), L2-normalised.
        logit_scale: scalar (exponentiated).
        image_queue, text_queue: (Q, D) L2-normalised, no gradient (Q may be 0).
    """

    def __init__(self, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.rank, self.world_size = rank, world_size

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
        image_queue: torch.Tensor, text_queue: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        if self.world_size > 1:
            image_features, text_features = open_clip.loss.gather_features(
                image_features, text_features, gather_with_grad=True, rank=self.rank, world_size=self.world_size)
        img, txt, scale = image_features.float(), text_features.float(), logit_scale.float()
        with _autocast_off(img):
            i2t = scale * img @ torch.cat([txt, text_queue.float()]).T
            t2i = scale * txt @ torch.cat([img, image_queue.float()]).T
            labels = torch.arange(img.shape[0], device=img.device)
            return {"contrastive_loss": (F.cross_entropy(i2t, labels) + F.cross_entropy(t2i, labels)) / 2}


class SimClrLoss(nn.Module):
    """NT-Xent (SimCLR): each view's positive is the other view of its image, its negatives
    the 2B − 2 other views of the batch; the mean over all 2B views, scaled by ``weight``.

    Args:
        temperature: τ dividing the cosine similarities (SimCLR and SLIP use 0.1).
        weight: multiplier in the total loss.

    Shape:
        z1, z2: (B, D) projections of the two views, L2-normalised.
    """

    def __init__(self, temperature: float = 0.1, weight: float = 1.0):
        super().__init__()
        self.temperature, self.weight = temperature, weight

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> dict[str, torch.Tensor]:
        z = torch.cat([z1, z2]).float()
        n = z1.shape[0]
        logits = (z @ z.T) / self.temperature
        logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
        targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
        return {"image_ssl_loss": self.weight * F.cross_entropy(logits, targets)}


class CaptionLoss(open_clip.loss.CoCaLoss):
    """CoCa's captioning loss (open_clip's ``CoCaLoss`` without its contrastive half, which
    clipalign's own contrastive loss provides): next-token cross-entropy, padding ignored.

    Args:
        weight: multiplier in the total loss.
        pad_id: the tokenizer's padding id (open_clip's: 0).

    Shape:
        logits: (B, L-1, V) the decoder's predictions; labels: (B, L-1) the next tokens.
    """

    def __init__(self, weight: float = 1.0, pad_id: int = 0):
        super().__init__(caption_loss_weight=weight, clip_loss_weight=0.0, pad_id=pad_id)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {"caption_loss": self.caption_loss_weight * self.caption_loss(logits.float().permute(0, 2, 1), labels)}


class MaeLoss(nn.Module):
    """MAE's reconstruction loss: mean squared error on the dropped patches only, against each
    patch's pixels normalised by their own mean and variance (MAE's ``norm_pix_loss``).

    Args:
        weight: multiplier in the total loss.

    Shape:
        pred: (B, N, P) predicted pixels of every patch; target: (B, N, P) the image's patches
        (``clipalign.mae.patchify``); kept: (B, K) indices of the visible patches.
    """

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = weight

    def forward(self, pred: torch.Tensor, target: torch.Tensor, kept: torch.Tensor) -> dict[str, torch.Tensor]:
        target = target.float()
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        dropped = torch.ones(target.shape[:2], dtype=torch.bool, device=target.device)
        dropped[torch.arange(len(kept), device=kept.device)[:, None], kept] = False
        per_patch = ((pred.float() - target) ** 2).mean(-1)  # (B, N)
        return {"image_ssl_loss": self.weight * per_patch[dropped].mean()}


def mlm_hits(logits: torch.Tensor, targets: torch.Tensor) -> int:
    """How many of (M, V) ``logits`` put their top-1 on the (M,) ``targets`` (an
    ``IGNORE_INDEX`` target is never hit).

    ``max(-1).indices``, not ``argmax``: the same first-maximum index, 3x faster on (M, 49408)
    bf16 logits on a CPU (40 ms a step on ca-small's MLM).
    """
    return int((logits.detach().max(dim=-1).indices == targets).sum())


def mlm_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of masked positions whose top-1 prediction is the original token."""
    counted = int((targets != IGNORE_INDEX).sum())
    if counted == 0:
        return float("nan")
    return mlm_hits(logits, targets) / counted
