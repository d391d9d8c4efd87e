"""The trainer: streaming shards, contrastive + masked-token objective, atomic checkpoints, resume."""
from __future__ import annotations

import fcntl
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from clipalign import checkpoint as ckpt
from clipalign.data import merge_skip_counts, resolve_shards, train_loader, train_pipeline
from clipalign.factory import create_model_and_transforms, get_tokenizer
from clipalign.loss import ClipLoss, MlmLoss, SigLipLoss, mlm_accuracy
from clipalign.masking import mask_tokens
from clipalign.precision import attention_backend, autocast
from clipalign.schedule import warmup_cosine_scheduler

MAX_LOGIT_SCALE = math.log(100)
CONTRASTIVE_LOSSES = ("clip", "siglip")  # CLIP clamps the learned inverse temperature at 100


@dataclass
class TrainConfig:
    """Everything that defines a run; saved as ``config.json`` and in every checkpoint."""

    data: str
    out: str
    model: str = "ca-tiny"
    pretrained: str | None = None
    lock_image: bool = False  # LiT: train the text tower against a frozen image tower
    lock_text: bool = False
    patch_dropout: float | None = None  # FLIP: drop this fraction of image patches while training
    grad_checkpointing: bool = False
    loss: str = "clip"  # "clip" (softmax InfoNCE) or "siglip" (sigmoid)
    steps: int = 1000
    batch_size: int = 128
    lr: float = 5e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup: int = 100
    grad_clip: float = 1.0
    precision: str = "bf16"
    attention: str = "math"
    workers: int = 1
    shuffle_buffer: int = 2000
    mlm_weight: float = 0.1
    mlm_rate: float = 0.15
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    max_nonfinite_steps: int = 10
    resume: bool = False


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on gains, biases (every 1-d tensor) or the temperature."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or "logit_scale" in name
        (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class NonFiniteLossError(RuntimeError):
    """The loss stayed NaN or infinite for ``max_nonfinite_steps`` steps in a row."""


class ResumeMismatchError(ValueError):
    """The run to resume was trained with a structurally different model."""


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep only the metrics lines of steps up to ``step``."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


class RunLockedError(RuntimeError):
    """Another live process is training into the same run folder."""


def _lock_run(run_dir: Path) -> IO[str]:
    """Hold an exclusive lock on ``run_dir/.lock`` while training; released when the file closes
    (or the process dies, so a killed run never leaves a stale lock behind)."""
    handle = (run_dir / ".lock").open("a+")  # not "w": that would wipe the holder's pid
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RunLockedError(f"another process is training into {run_dir}") from None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


class Trainer:
    """One training run. ``Trainer(cfg).fit()`` runs it to ``cfg.steps``, resuming if asked."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.out = Path(cfg.out)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        if cfg.loss not in CONTRASTIVE_LOSSES:
            raise ValueError(f"unknown loss {cfg.loss!r} (one of {', '.join(CONTRASTIVE_LOSSES)})")
        siglip = cfg.loss == "siglip"
        self.model, self.train_transform, _ = create_model_and_transforms(
            cfg.model, mlm_head=cfg.mlm_weight > 0, pretrained=cfg.pretrained, force_patch_dropout=cfg.patch_dropout,
            # SigLIP's initialisation: temperature 1/10 and a bias of -10 (few positives per batch)
            init_logit_scale=math.log(10) if siglip else None, init_logit_bias=-10.0 if siglip else None,
        )
        if cfg.lock_image:
            self.model.clip.lock_image_tower()
        if cfg.lock_text:
            self.model.clip.lock_text_tower()
        if cfg.grad_checkpointing:
            self.model.clip.set_grad_checkpointing(True)
        self.tokenizer = get_tokenizer(cfg.model)
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps
        )
        self.scheduler = warmup_cosine_scheduler(self.optimizer, cfg.warmup, cfg.steps)
        self.clip_loss = SigLipLoss() if siglip else ClipLoss()
        self.mlm_loss = MlmLoss(cfg.mlm_weight) if cfg.mlm_weight > 0 else None
        self.step = 0
        self.skipped: dict[int, dict[str, int]] = {}
        self.nonfinite_steps = 0
        self.nonfinite_in_a_row = 0

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "model_name": self.cfg.model,
            "config": asdict(self.cfg),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": _rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["model_name"] != self.cfg.model:
            raise ResumeMismatchError(f"the checkpoint is for model {state['model_name']!r}, not {self.cfg.model!r}")
        if state.get("config", {}).get("loss", "clip") != self.cfg.loss:
            raise ResumeMismatchError(f"the checkpoint was trained with --loss {state['config'].get('loss', 'clip')}")
        had_head = any(k.startswith("mlm_head.") for k in state["model"])
        if had_head != (self.model.mlm_head is not None):
            raise ResumeMismatchError(
                f"the checkpoint was trained {'with' if had_head else 'without'} the MLM head; "
                f"resume with --mlm-weight {'> 0' if had_head else '0'}"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        self.step = state["step"]

    def save(self) -> Path:
        path = ckpt.save_checkpoint(ckpt.checkpoint_path(self.out, self.step), self.state_dict())
        ckpt.prune_checkpoints(self.out, self.cfg.keep_checkpoints)
        return path

    # -- one step ----------------------------------------------------------------------------
    def train_step(self, images: torch.Tensor, texts: torch.Tensor) -> dict[str, float]:
        """Forward, backward and update on one batch; returns the logged scalars.

        Args:
            images: (B, 3, H, W) normalised images.
            texts: (B, L) token ids.
        """
        cfg, model = self.cfg, self.model
        masked = labels = None
        if self.mlm_loss is not None:
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step)
            masked, labels = mask_tokens(
                texts,
                mask_id=model.mask_id,
                eot_id=self.tokenizer.eot_token_id,
                random_high=self.tokenizer.sot_token_id,
                rate=cfg.mlm_rate,
                generator=gen,
            )
        with autocast(cfg.precision):
            out = model(images, texts, masked, labels)
            extra = (out["logit_bias"],) if self.cfg.loss == "siglip" else ()
            losses = self.clip_loss(out["image_features"], out["text_features"], out["logit_scale"], *extra)
            if self.mlm_loss is not None:
                losses.update(self.mlm_loss(out["mlm_logits"], out["mlm_targets"]))
        total = sum(v for k, v in losses.items() if k.endswith("_loss"))

        self.optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(total):
            # Skip the update rather than corrupt the weights; give up when it keeps happening.
            self.nonfinite_steps += 1
            self.nonfinite_in_a_row += 1
            if self.nonfinite_in_a_row >= cfg.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"the loss was not finite {self.nonfinite_in_a_row} steps in a row (step {self.step + 1}); "
                    "lower --lr, check the data, or try --precision fp32"
                )
        else:
            self.nonfinite_in_a_row = 0
            total.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        self.scheduler.step()
        self.step += 1

        logs = {k: v.item() for k, v in losses.items()}
        logs["loss"] = total.item()
        logs["logit_scale"] = out["logit_scale"].item()
        logs["temperature"] = 1.0 / logs["logit_scale"]
        if self.mlm_loss is not None:
            logs["mlm_acc"] = mlm_accuracy(out["mlm_logits"], out["mlm_targets"])
        return logs

    # -- the loop ----------------------------------------------------------------------------
    def fit(self, progress: Callable[..., Any] | None = None) -> dict[str, Any]:
        """Run to ``cfg.steps``; returns a summary. ``progress`` is a tqdm-like factory."""
        cfg = self.cfg
        shards = resolve_shards(cfg.data)
        if not shards:
            raise FileNotFoundError(f"no shards found at {cfg.data}")
        self.out.mkdir(parents=True, exist_ok=True)
        with _lock_run(self.out):
            resumed_from = None
            if cfg.resume and (latest := ckpt.latest_checkpoint(self.out)) is not None:
                self.load_state_dict(ckpt.load_checkpoint(latest))
                resumed_from = str(latest)
            # Steps logged after the checkpoint we resume from (a kill between two checkpoints)
            # are about to be run again: drop their old lines.
            _truncate_metrics(self.out / "metrics.jsonl", self.step)
            (self.out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
            return self._fit(shards, resumed_from, progress)

    def _fit(self, shards: list[str], resumed_from: str | None, progress: Callable[..., Any] | None) -> dict[str, Any]:
        cfg = self.cfg
        # A resumed run draws a fresh data stream rather than replaying the one already seen.
        pipeline = train_pipeline(
            shards,
            transform=self.train_transform,
            tokenizer=self.tokenizer,
            batch_size=cfg.batch_size,
            seed=cfg.seed + 7919 * self.step,
            shuffle_buffer=cfg.shuffle_buffer,
        )
        batches = iter(train_loader(pipeline, cfg.workers))
        bar = progress(total=cfg.steps, initial=self.step, unit="step") if progress else None
        first_step, start = self.step, time.perf_counter()
        self.model.train()
        with (self.out / "metrics.jsonl").open("a") as metrics, attention_backend(cfg.attention):
            try:
                logs = self._loop(batches, bar, metrics)
            finally:
                if bar is not None:
                    bar.close()
        elapsed = time.perf_counter() - start
        steps_run = self.step - first_step
        return {
            "steps": self.step,
            "steps_this_run": steps_run,
            "resumed_from": resumed_from,
            "seconds": elapsed,
            "samples_per_s": steps_run * cfg.batch_size / elapsed if elapsed > 0 else 0.0,
            "final": logs,
            "skipped": merge_skip_counts(self.skipped),
            "nonfinite_steps": self.nonfinite_steps,
            "checkpoint": str(ckpt.latest_checkpoint(self.out)),
        }

    def _loop(self, batches: Iterator, bar: Any, metrics: IO[str]) -> dict[str, float]:
        """Steps until ``cfg.steps``, logging and checkpointing on schedule; returns the last logs."""
        cfg, logs = self.cfg, {}
        window_start, window_samples = time.perf_counter(), 0
        while self.step < cfg.steps:
            images, texts, skip_info = next(batches)
            self.skipped[skip_info["worker"]] = skip_info["skipped"]
            logs = self.train_step(images, texts)
            window_samples += images.shape[0]
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{logs['loss']:.3f}", T=f"{logs['temperature']:.3f}")
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                now = time.perf_counter()
                record = {
                    "step": self.step,
                    "lr": self.scheduler.get_last_lr()[0],
                    **logs,
                    "samples_per_s": window_samples / (now - window_start),
                    "skipped": merge_skip_counts(self.skipped),
                    "nonfinite_steps": self.nonfinite_steps,
                }
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                window_start, window_samples = now, 0
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                self.save()
        return logs
