"""The trainer: the training loop and step over streaming shards, checkpoints and resume.

The run's settings are ``clipalign.train_config``'s, its objectives ``clipalign.objectives``'s
and what it writes besides checkpoints ``clipalign.run_folder``'s.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from clipalign import checkpoint as ckpt
from clipalign import distributed as D
from clipalign.data import StreamPosition, merge_skip_counts, resolve_shards, train_loader, train_pipeline
from clipalign.factory import create_model_and_transforms, get_tokenizer
from clipalign.model import text_length
from clipalign.objectives import build_objectives, optimizer_groups
from clipalign.pixels import loader_transforms, normalize_batch
from clipalign.precision import attention_backend, autocast
from clipalign.resume import (TRAINING_STATE, ResumeMismatchError, check_resumable, resume_stream, rng_state,
                              set_rng_state)
from clipalign.run_folder import RunLockedError, RunWriter, StepTimes
from clipalign.schedule import warmup_cosine_scheduler
from clipalign.train_config import TrainConfig

__all__ = ["NonFiniteLossError", "ResumeMismatchError", "RunLockedError", "TrainConfig", "Trainer", "split_batch"]

MAX_LOGIT_SCALE = math.log(100)  # CLIP clamps the learned inverse temperature at 100


class NonFiniteLossError(RuntimeError):
    """The loss stayed NaN or infinite for ``max_nonfinite_steps`` steps in a row."""


def split_batch(batch: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    """``parts`` equal micro-batches of a batch of tensors (along dim 0)."""
    chunks = {k: v.chunk(parts) for k, v in batch.items()}
    return [{k: c[i] for k, c in chunks.items()} for i in range(parts)]


class Trainer:
    """One training run. ``Trainer(cfg).fit()`` runs it to ``cfg.steps``, resuming if asked.

    Under ``torchrun`` each process is one rank: contrastive negatives are gathered from all
    ranks, gradients averaged, and rank 0 alone writes checkpoints and logs.

    Attributes:
        cfg: the run's config, its precision resolved (never ``"auto"``).
        objectives: the losses, SimCLR's head and the MoCo queues (``clipalign.objectives``).
        stream_seed: the seed of the data stream: ``cfg.seed``, or a new one where a resume
            cannot replay the checkpoint's stream (``clipalign.resume.resume_stream``).
    """

    def __init__(self, cfg: TrainConfig, env: D.DistEnv | None = None):
        # the data is checked when fit() opens it: a trainer may also run steps on batches it is given
        cfg.validate(paths=False)
        cfg = self.cfg = cfg.resolved()
        self.env = env if env is not None else D.init_distributed()
        self.device = self.env.device
        self.out = Path(cfg.out)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        siglip = cfg.loss == "siglip"
        self.model, self.train_transform, self.eval_transform = create_model_and_transforms(
            cfg.model, mlm_head=cfg.mlm_weight > 0, mlm_condition=cfg.mlm_condition, fusion_layers=cfg.fusion_layers,
            pretrained=cfg.pretrained, force_patch_dropout=cfg.patch_dropout,
            # SigLIP's initialisation: temperature 1/10 and a bias of -10 (few positives per batch)
            init_logit_scale=math.log(10) if siglip else None, init_logit_bias=-10.0 if siglip else None,
        )
        if cfg.lock_image:
            self.model.clip.lock_image_tower()
        if cfg.lock_text:
            self.model.clip.lock_text_tower()
        if cfg.grad_checkpointing:
            self.model.clip.set_grad_checkpointing(True)
        self.model.to(self.device)
        D.broadcast_parameters(self.model, self.env)
        self.tokenizer = get_tokenizer(cfg.model)
        self.objectives = build_objectives(cfg, self.model, self.tokenizer, self.env.rank, self.env.world_size,
                                           self.device)
        self.loader_transform, self.loader_views, self.normalizers = loader_transforms(
            self.train_transform, self.objectives.view_transform)
        for head in self.objectives.trained_heads():
            D.broadcast_parameters(head, self.env)
        params = optimizer_groups(self.model, self.objectives, cfg.weight_decay)
        # fused: one kernel over all parameters (it saved ≈ 2.5 % of a ca-small step on a 2-core CPU)
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=True)
        self.scheduler = warmup_cosine_scheduler(self.optimizer, cfg.warmup, cfg.steps)
        self.step = 0
        self.position = StreamPosition()
        self.stream_seed = cfg.seed
        self.skipped: dict[int, dict[str, int]] = {}
        self.skipped_before: dict[str, int] = {}  # counts of the runs this one resumed
        self.nonfinite_steps = 0
        self.nonfinite_in_a_row = 0

    # -- state -------------------------------------------------------------------------------
    def state_dict(self, positions: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Everything a resumed run needs to continue step for step. ``positions``: every
        rank's data stream position (default: this rank's only)."""
        state = {
            "step": self.step,
            "model_name": self.cfg.model,
            "config": asdict(self.cfg),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "data": {"positions": positions or [asdict(self.position)], "skipped": self.skipped_total()},
        }
        state.update({key: module.state_dict() for key, module in self.objectives.stateful().items()})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (a ``state_dict``); ``ResumeMismatchError`` if another model made it."""
        check_resumable(state, self.cfg, self.model, self.objectives)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for key, module in self.objectives.stateful().items():
            module.load_state_dict(state[key])
        set_rng_state(state["rng"])
        self.step = state["step"]
        self.skipped_before = dict(state.get("data", {}).get("skipped", {}))
        self.position, self.stream_seed = resume_stream(state, self.cfg, self.env.rank, self.env.world_size)

    def skipped_total(self) -> dict[str, int]:
        total = Counter(self.skipped_before)
        total.update(merge_skip_counts(self.skipped))
        return dict(total)

    def save(self) -> Path | None:
        """Checkpoint (rank 0 writes; every rank contributes its stream position)."""
        positions = D.gather_objects(asdict(self.position), self.env)
        if not self.env.is_main:
            return None
        path = ckpt.save_checkpoint(ckpt.checkpoint_path(self.out, self.step), self.state_dict(positions))
        ckpt.prune_checkpoints(self.out, self.cfg.keep_checkpoints)
        return path

    # -- one step ----------------------------------------------------------------------------
    def _features(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with autocast(self.cfg.precision, self.device.type):
            return self.model(batch["image"], batch["text"])

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Forward, backward and update on one batch; returns the logged scalars.

        Args:
            batch: ``image`` (B, 3, H, W) images, normalised or the loader's uint8 (normalised here,
                ``self.normalizers``), ``text`` (B, L) token ids; with the MLM head ``masked_text`` and
                ``mlm_labels`` (B, L) from ``mask_tokens``; with SimCLR ``views`` (B, 2, 3, H, W).

        With ``accum_steps`` K > 1 the batch is run as K micro-batches. Their features are
        first computed without gradients, then each micro-batch is recomputed with gradients
        and its loss taken against the whole batch's features (as open_clip's
        ``--accum-freq``), so the gradient equals that of one pass over the whole batch.
        """
        cfg, model, obj = self.cfg, self.model, self.objectives
        batch = normalize_batch({k: v.to(self.device, non_blocking=True) for k, v in batch.items()}, self.normalizers)
        if obj.mlm is not None and "masked_text" not in batch:
            batch["masked_text"], batch["mlm_labels"] = self.mask(batch["text"])
        batch = self.drop_padding(batch)
        micro = split_batch(batch, cfg.accum_steps)
        mlm_count = masked = None
        if obj.mlm is not None:
            # The MLM loss is a mean over the step's masked tokens, on all micro-batches and ranks.
            masked = D.sum_over_ranks(sum(obj.masked_count(m) for m in micro), self.env)
            mlm_count = masked / self.env.world_size

        cached = None
        if len(micro) > 1:
            with torch.no_grad():
                outs = [self._features(m) for m in micro]
            cached = ([o["image_features"] for o in outs], [o["text_features"] for o in outs])

        self.optimizer.zero_grad(set_to_none=True)
        logs: Counter[str] = Counter()
        finite = True
        step_features = []
        for j, mb in enumerate(micro):
            with autocast(cfg.precision, self.device.type):
                out = model(mb["image"], mb["text"], image_tokens=model.mlm_fusion is not None or obj.mae is not None,
                            caption=obj.caption is not None)
                image, text = out["image_features"], out["text_features"]
                step_features.append((image.detach(), text.detach()))
                if cached is not None:
                    image = torch.cat(cached[0][:j] + [image] + cached[0][j + 1:])
                    text = torch.cat(cached[1][:j] + [text] + cached[1][j + 1:])
                # every micro-batch's loss is the whole batch's: its temperature gradient counts once
                losses = obj.contrastive_loss(image, text, out, scale_grad=j == 0)
                if obj.mlm is not None:
                    mlm_losses, hits = obj.mlm_loss(model, mb, out, mlm_count)
                    losses.update(mlm_losses)
                    logs["mlm_correct"] += hits
                # per micro-batch means: each counts 1/K of the step's
                losses.update({k: v / len(micro) for k, v in obj.micro_batch_losses(model, mb, out).items()})
            total = sum(v for k, v in losses.items() if k.endswith("_loss"))
            finite = D.all_ranks_agree(bool(torch.isfinite(total)), self.env)
            if not finite:
                break
            total.backward()
            for k, v in losses.items():
                # the contrastive loss is the whole batch's on every micro-batch: count it once
                logs[k] += v.item() / (len(micro) if k == "contrastive_loss" else 1)
        self.optimizer_step(finite)
        if finite and obj.queues is not None:
            obj.enqueue(batch["image"], batch["text"], step_features, cfg.precision, self.device.type)

        logs = dict(logs)
        if not finite:
            logs = {"loss": float("nan")}
        logs["logit_scale"] = out["logit_scale"].item()
        logs["temperature"] = 1.0 / logs["logit_scale"]
        correct = logs.pop("mlm_correct", None)
        logs = D.mean_over_ranks(logs, self.env)
        if correct is not None:
            logs["mlm_acc"] = D.sum_over_ranks(correct, self.env) / max(1, masked)
        if finite:
            logs["loss"] = sum(v for k, v in logs.items() if k.endswith("_loss"))
        return logs

    def drop_padding(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Cut the token columns that are padding in every caption of the batch.

        Exact: the MLM pass never attends to padding, and the contrastive text features of a
        tower for which ``ClipAlign.trims_text`` holds do not depend on it (other towers keep
        their full ``text``). Captions are usually far shorter than the context (the embedded
        corpus: at most ~18 of 32 tokens in a batch), so this saves much of the text towers' work.
        """
        length = text_length(batch["text"], self.tokenizer.eot_token_id)
        keys = {"masked_text", "mlm_labels"} | ({"text"} if self.model.trims_text else set())
        return {k: v[:, :length] if k in keys else v for k, v in batch.items()}

    def mask(self, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MLM inputs for (B, L) ids when the loader has not made them (seeded by step)."""
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.step)
        masked, labels = self.objectives.masker(texts.cpu(), generator=gen)
        return masked.to(self.device), labels.to(self.device)

    @property
    def _masker(self) -> Callable[..., tuple[torch.Tensor, torch.Tensor]] | None:
        """``objectives.masker``, under the name tests/helpers/dist_step.py uses."""
        return self.objectives.masker

    def optimizer_step(self, finite: bool) -> None:
        """Update (averaging gradients over ranks), or skip a non-finite step and count it."""
        cfg = self.cfg
        if not finite:
            # Skip the update rather than corrupt the weights; give up when it keeps happening.
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_steps += 1
            self.nonfinite_in_a_row += 1
            if self.nonfinite_in_a_row >= cfg.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"the loss was not finite {self.nonfinite_in_a_row} steps in a row (step {self.step + 1}); "
                    "lower --lr, check the data, or try --precision fp32"
                )
        else:
            self.nonfinite_in_a_row = 0
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            D.average_gradients(params, self.env)
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            self.optimizer.step()
            with torch.no_grad():
                self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            if self.objectives.queues is not None:
                self.objectives.queues.update(self.model)
        self.scheduler.step()
        self.step += 1

    # -- the loop ----------------------------------------------------------------------------
    def fit(self, progress: Callable[..., Any] | None = None) -> dict[str, Any]:
        """Run to ``cfg.steps``; returns a summary. ``progress`` is a tqdm-like factory."""
        cfg = self.cfg
        shards = resolve_shards(cfg.data)
        if not shards:
            raise FileNotFoundError(f"no shards found at {cfg.data}")
        run = RunWriter(self.out, cfg.tensorboard) if self.env.is_main else None  # rank 0 alone writes
        with run if run is not None else contextlib.nullcontext():
            resumed_from = None
            # a truncated newest checkpoint (a crash or a full disk mid-write) gives way to the one before
            if cfg.resume and (found := ckpt.load_latest(self.out, require=TRAINING_STATE)) is not None:
                latest, state = found
                self.load_state_dict(state)
                resumed_from = str(latest)
            if run is not None:
                run.begin(asdict(cfg), self.step)
            summary = self._fit(shards, resumed_from, progress if run is not None else None, run)
            if run is not None:
                run.finish(summary)
        return summary

    def _pipeline(self, shards: list[str]):
        """This rank's batches of ``shards`` from ``self.position`` on (with SimCLR's views and
        the MLM inputs where those objectives are on)."""
        cfg = self.cfg
        return train_pipeline(
            shards, transform=self.loader_transform, tokenizer=self.tokenizer, batch_size=cfg.batch_size,
            seed=self.stream_seed, shuffle_buffer=cfg.shuffle_buffer, workers=cfg.workers, rank=self.env.rank,
            position=self.position, view_transform=self.loader_views,
            masker=self.objectives.masker,
        )

    def _fit(self, shards: list[str], resumed_from: str | None, progress: Callable[..., Any] | None,
             run: RunWriter | None) -> dict[str, Any]:
        cfg = self.cfg
        batches = iter(train_loader(self._pipeline(shards), cfg.workers))
        bar = progress(total=cfg.steps, initial=self.step, unit="step") if progress else None
        first_step, start, times = self.step, time.perf_counter(), StepTimes()
        self.model.train()
        with attention_backend(cfg.attention):
            try:
                logs = self._loop(batches, bar, run, times)
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
            "samples_per_s": steps_run * cfg.batch_size * self.env.world_size / elapsed if elapsed > 0 else 0.0,
            "data_wait_frac": times.waited_s / elapsed if elapsed > 0 else 0.0,  # of the time, the step waited
            "final": logs,
            "skipped": self.skipped_total(),
            "nonfinite_steps": self.nonfinite_steps,
            "checkpoint": str(ckpt.latest_checkpoint(self.out)),
        }

    def _loop(self, batches: Iterator, bar: Any, run: RunWriter | None, times: StepTimes) -> dict[str, float]:
        """Steps until ``cfg.steps``, logging, evaluating and checkpointing on schedule."""
        cfg, logs = self.cfg, {}
        while self.step < cfg.steps:
            asked = time.perf_counter()
            batch, info = next(batches)
            waited = time.perf_counter() - asked
            self.skipped[info["role"]] = info["skipped"]
            self.position = self.position.advance(info["role"], info["consumed"])
            logs = self.train_step(batch)
            times.step(batch["image"].shape[0] * self.env.world_size, waited)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{logs['loss']:.3f}", T=f"{logs['temperature']:.3f}")
            evals = self.evaluate() if cfg.eval_every and self.step % cfg.eval_every == 0 else {}
            if self.step % cfg.log_every == 0 or self.step == cfg.steps or evals:
                record = {
                    "step": self.step,
                    "lr": self.scheduler.get_last_lr()[0],
                    **logs,
                    **times.window(),
                    "skipped": self.skipped_total(),
                    "nonfinite_steps": self.nonfinite_steps,
                    **evals,
                }
                if run is not None:
                    run.log(record)
                times.restart()  # the next window starts after this evaluation and log
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                self.save()
        return logs

    def evaluate(self) -> dict[str, float]:
        """Zero-shot metrics on ``cfg.eval_sets`` (rank 0), as ``eval/<set>/<metric>`` scalars."""
        results: dict[str, float] = {}
        if self.env.is_main:
            from clipalign.evaluate import evaluate, load_eval_set

            self.model.eval()
            for root in self.cfg.eval_sets:
                evalset = load_eval_set(root)
                res = evaluate(self.model, self.tokenizer, self.eval_transform, evalset, precision=self.cfg.precision)
                for name, value in res["metrics"].items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        results[f"eval/{evalset.name}/{name}"] = float(value)
            self.model.train()
        D.barrier(self.env)
        return results

