"""A run's objectives, assembled from its ``TrainConfig``: the contrastive loss, the MLM loss,
SimCLR's head and loss, MAE's decoder and loss, the MoCo queues, and the optimizer's parameter groups.

The losses themselves are the small modules of ``clipalign.loss``; this module only picks
and wires them.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from clipalign.image_ssl import ProjectionHead, simclr_view_transform
from clipalign.loss import CaptionLoss, ClipLoss, MaeLoss, MlmLoss, QueueClipLoss, SigLipLoss, SimClrLoss, mlm_hits
from clipalign.mae import MaeDecoder, RecordingPatchDropout, install_recording_dropout, mae_decoder_for, patchify
from clipalign.masking import IGNORE_INDEX, mask_tokens, masking_ids, stop_token_ids
from clipalign.model import ClipAlign
from clipalign.momentum import MomentumQueues
from clipalign.precision import autocast
from clipalign.train_config import TrainConfig

# The MLM logits' rows are padded to a multiple of this (ClipAlign.mlm_logits). The masked count
# changes every step, and with freed memory kept (memory.keep_freed_memory) each new size of the
# (M, 49408) logits and their gradient took fresh heap: ca-small, batch 128, grew 2.9 -> 3.5 GB
# RSS over 120 steps with thousands of page faults a step; padded, it stays flat (BENCHMARKS.md).
MLM_ROW_MULTIPLE = 64


@dataclass
class Objectives:
    """The losses of a run, and the modules besides the model that they train or fill.

    Attributes:
        contrastive: ``ClipLoss``, ``SigLipLoss`` or (with a queue) ``QueueClipLoss``.
        uses_bias: the contrastive loss takes the model's ``logit_bias`` (SigLIP).
        mlm: the masked-token loss, or ``None`` with ``mlm_weight`` 0.
        mlm_fraction: the share of each micro-batch's rows (its first ones) the MLM pass runs on.
        masker: its input corruption, ``mask_tokens`` bound to the model's and tokenizer's
            special ids: (B, L) ids -> (masked ids, labels), both (B, L); else ``None``.
        ssl_head, ssl: SimCLR's projection head and loss (``image_ssl="simclr"``, the default), else
            ``None`` (``"none"``).
        view_transform: SimCLR's augmentation, a PIL image to one random (3, H, W) view (the
            loader draws two per image), else ``None``.
        queues: the MoCo feature queues (``queue_size`` > 0), else ``None``.
        mae_decoder, mae, patch_dropout: MAE's decoder and loss and the patch dropout that
            records the visible patches (``image_ssl="mae"``), else ``None``.
        patch: the ViT's patch side, for MAE's pixel targets.
        caption: CoCa's captioning loss (``caption_weight`` > 0), else ``None``.
    """

    contrastive: nn.Module
    uses_bias: bool = False
    mlm: MlmLoss | None = None
    mlm_fraction: float = 1.0
    masker: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
    ssl_head: ProjectionHead | None = None
    ssl: SimClrLoss | None = None
    view_transform: Callable[..., torch.Tensor] | None = None
    queues: MomentumQueues | None = None
    mae_decoder: MaeDecoder | None = None
    mae: MaeLoss | None = None
    patch_dropout: RecordingPatchDropout | None = None
    patch: int = 0
    caption: CaptionLoss | None = None

    def contrastive_loss(self, image: torch.Tensor, text: torch.Tensor, out: dict[str, torch.Tensor],
                         scale_grad: bool = True) -> dict[str, torch.Tensor]:
        """The contrastive loss of (N, D) image and text features against each other (and the queues).

        Args:
            image, text: (N, D) features of the whole batch.
            out: the model's output, for ``logit_scale`` (and ``logit_bias``).
            scale_grad: ``False`` keeps the temperature (and bias) out of the backward pass,
                for all micro-batches of an accumulated step but one.
        """
        scale = out["logit_scale"] if scale_grad else out["logit_scale"].detach()
        if self.queues is not None:
            return self.contrastive(image, text, scale, **self.queues.queued())
        extra = ((out["logit_bias"] if scale_grad else out["logit_bias"].detach()),) if self.uses_bias else ()
        return self.contrastive(image, text, scale, *extra)

    def enqueue(self, images: torch.Tensor, texts: torch.Tensor, features: list[tuple[torch.Tensor, torch.Tensor]],
                precision: str, device_type: str) -> None:
        """Push a finished step's batch into the queues: (B, 3, H, W) images and (B, L) texts
        through the momentum encoders, or with momentum 0 the step's own (b, D) image and text
        ``features`` of each micro-batch."""
        if self.queues.ema is None:
            self.queues.push_features(torch.cat([f[0] for f in features]), torch.cat([f[1] for f in features]))
        else:
            with autocast(precision, device_type):
                self.queues.push(images, texts)

    def mlm_rows(self, n: int) -> int:
        """How many of a micro-batch's ``n`` rows the MLM pass runs on (at least one)."""
        return max(1, math.ceil(self.mlm_fraction * n))

    def masked_count(self, batch: dict[str, torch.Tensor]) -> int:
        """The masked tokens of a micro-batch's ``mlm_labels`` (b, L) in the rows the MLM pass runs on."""
        labels = batch["mlm_labels"]
        return int((labels[: self.mlm_rows(len(labels))] != IGNORE_INDEX).sum())

    def mlm_loss(self, model: ClipAlign, batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor],
                 count: float | None) -> tuple[dict[str, torch.Tensor], int]:
        """The MLM loss of one micro-batch, and how many of its masked tokens it predicts top-1.

        Args:
            batch: ``masked_text`` and ``mlm_labels`` (b, L) from ``mask_tokens``.
            out: the model's output on it, for the ``image_tokens`` of an image-conditioned MLM
                (the same image pass).
            count: the step's masked tokens on all micro-batches and ranks, the loss's mean.
        """
        rows = self.mlm_rows(len(batch["masked_text"]))
        tokens = out["image_tokens"][:rows] if "image_tokens" in out else None
        logits, targets = model.mlm_logits(batch["masked_text"][:rows], batch["mlm_labels"][:rows], tokens,
                                           row_multiple=MLM_ROW_MULTIPLE)
        return self.mlm(logits, targets, count), mlm_hits(logits, targets)

    def micro_batch_losses(self, model: ClipAlign, batch: dict[str, torch.Tensor],
                           out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The captioning, MAE and SimCLR losses of one micro-batch (a mean over its rows each).

        Args:
            batch: ``image`` (b, 3, H, W), with SimCLR ``views`` (b, 2, 3, H, W).
            out: the model's output on it: CoCa's ``caption_logits``/``caption_labels``, and the
                ``image_tokens`` of the pass whose dropped patches MAE reconstructs.
        """
        losses: dict[str, torch.Tensor] = {}
        if self.caption is not None:
            losses.update(self.caption(out["caption_logits"], out["caption_labels"]))
        if self.mae is not None:  # on the patches this very pass did not see
            kept = self.patch_dropout.kept
            pred = self.mae_decoder(out["image_tokens"], kept)
            losses.update(self.mae(pred, patchify(batch["image"], self.patch), kept))
        if self.ssl is not None:
            views = batch["views"].flatten(0, 1)  # (2b, 3, H, W): view 1 and 2 of each image
            z = self.ssl_head(model.encode_image(views, normalize=False).float()).unflatten(0, (-1, 2))
            losses.update(self.ssl(z[:, 0], z[:, 1]))
        return losses

    def stateful(self) -> dict[str, nn.Module]:
        """The modules whose state a checkpoint keeps, by their key in it."""
        modules = (("ssl_head", self.ssl_head), ("queues", self.queues), ("mae_decoder", self.mae_decoder))
        return {key: m for key, m in modules if m is not None}

    def trained_heads(self) -> list[nn.Module]:
        """The modules besides the model whose parameters the optimizer updates."""
        return [m for m in (self.ssl_head, self.mae_decoder) if m is not None]


def build_objectives(cfg: TrainConfig, model: ClipAlign, tokenizer: Any, rank: int = 0, world_size: int = 1,
                     device: torch.device | str = "cpu") -> Objectives:
    """The objectives ``cfg`` asks for; new heads and queues are created on ``device``.

    Creating SimCLR's head draws from the torch RNG, so the order here is part of a seed's run.
    """
    siglip = cfg.loss == "siglip"
    if cfg.queue_size:
        contrastive = QueueClipLoss(rank, world_size)
    else:
        contrastive = SigLipLoss(rank, world_size) if siglip else ClipLoss(rank, world_size)
    objectives = Objectives(contrastive, uses_bias=siglip)
    if cfg.mlm_weight > 0:
        objectives.mlm = MlmLoss(cfg.mlm_weight)
        objectives.mlm_fraction = cfg.mlm_fraction
        stop_ids = stop_token_ids(tokenizer, tokenizer.eot_token_id) if cfg.mlm_target == "content" else None
        objectives.masker = functools.partial(mask_tokens, **masking_ids(tokenizer, model.mask_id),
                                              rate=cfg.mlm_rate, stop_ids=stop_ids)
    embed_dim = model.clip.text_projection.shape[1] if _has_text_projection(model) else None
    if cfg.image_ssl == "simclr":
        dim = embed_dim or model.encode_image(torch.zeros(1, 3, model.image_size, model.image_size)).shape[1]
        objectives.ssl_head = ProjectionHead(dim).to(device)
        objectives.ssl = SimClrLoss(cfg.ssl_temperature, cfg.image_ssl_weight)
        visual = model.clip.visual
        objectives.view_transform = simclr_view_transform(model.image_size, getattr(visual, "image_mean", None),
                                                          getattr(visual, "image_std", None))
    if cfg.caption_weight > 0:
        if not model.captions:
            raise ValueError(f"--caption-weight needs a model with a captioning decoder (CoCa); {cfg.model} has none")
        objectives.caption = CaptionLoss(cfg.caption_weight, pad_id=getattr(model.clip, "pad_id", 0))
    if cfg.image_ssl == "mae":
        objectives.patch_dropout = install_recording_dropout(model.clip.visual, cfg.patch_dropout or 0.0)
        objectives.mae_decoder = mae_decoder_for(model.clip.visual).to(device)
        objectives.mae = MaeLoss(cfg.image_ssl_weight)
        objectives.patch = model.clip.visual.patch_size[0]
    if cfg.queue_size:
        dim = embed_dim or model.encode_text(tokenizer(["x"])).shape[1]
        objectives.queues = MomentumQueues(model, cfg.queue_size, dim, cfg.momentum).to(device)
    return objectives


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on gains, biases (every 1-d tensor) or the temperature."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or "logit_scale" in name
        (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def optimizer_groups(model: nn.Module, objectives: Objectives, weight_decay: float) -> list[dict[str, Any]]:
    """``param_groups`` of the model, with the parameters of SimCLR's head or MAE's decoder added to them."""
    groups = param_groups(model, weight_decay)
    for head in objectives.trained_heads():
        extra = param_groups(head, weight_decay)
        groups = [{**g, "params": g["params"] + e["params"]} for g, e in zip(groups, extra)]
    return groups


def _has_text_projection(model: ClipAlign) -> bool:
    proj = getattr(model.clip, "text_projection", None)
    return isinstance(proj, torch.Tensor) and proj.ndim == 2
