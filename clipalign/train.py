"""The trainer: streaming shards, contrastive + masked-token objective, atomic checkpoints, resume."""
from __future__ import annotations

import fcntl
import functools
import json
import math
import os
import random
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from clipalign import checkpoint as ckpt
from clipalign import distributed as D
from clipalign.data import StreamPosition, merge_skip_counts, resolve_shards, train_loader, train_pipeline
from clipalign.factory import create_model_and_transforms, get_tokenizer
from clipalign.image_ssl import IMAGE_SSL, ProjectionHead, simclr_view_transform
from clipalign.loss import ClipLoss, MlmLoss, QueueClipLoss, SigLipLoss, SimClrLoss
from clipalign.masking import IGNORE_INDEX, mask_tokens
from clipalign.model import text_length
from clipalign.momentum import MomentumQueues
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
    accum_steps: int = 1  # split each batch into this many micro-batches; negatives stay the whole batch
    mlm_weight: float = 0.1
    mlm_rate: float = 0.15
    mlm_fraction: float = 1.0  # run the MLM pass on this fraction of each batch
    image_ssl: str | None = None  # "simclr": SimCLR on two augmented views (SLIP)
    image_ssl_weight: float = 1.0
    ssl_temperature: float = 0.1
    queue_size: int = 0  # MoCo-style queue of past features as extra negatives (0: off)
    momentum: float = 0.995  # EMA of the encoders that fill the queue (0: queue the step's own features)
    eval_sets: tuple[str, ...] = ()  # wds/ sets evaluated during training
    eval_every: int = 0
    tensorboard: bool = True
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    max_nonfinite_steps: int = 10
    resume: bool = False

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent setting."""
        if self.loss not in CONTRASTIVE_LOSSES:
            raise ValueError(f"unknown loss {self.loss!r} (one of {', '.join(CONTRASTIVE_LOSSES)})")
        if self.image_ssl is not None and self.image_ssl not in IMAGE_SSL:
            raise ValueError(f"unknown image objective {self.image_ssl!r} (one of {', '.join(IMAGE_SSL)})")
        if self.accum_steps < 1 or self.batch_size % self.accum_steps:
            raise ValueError(f"--accum-steps must divide --batch-size ({self.batch_size}), got {self.accum_steps}")
        if not 0 < self.mlm_fraction <= 1:
            raise ValueError("--mlm-fraction must be in (0, 1]")
        if self.queue_size and self.loss != "clip":
            raise ValueError("--queue-size works with --loss clip")
        if self.queue_size < 0 or not 0 <= self.momentum < 1:
            raise ValueError("--queue-size must be >= 0 and --momentum in [0, 1)")
        if self.eval_every and not self.eval_sets:
            raise ValueError("--eval-every needs --eval-sets")


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


def split_batch(batch: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    """``parts`` equal micro-batches of a batch of tensors (along dim 0)."""
    chunks = {k: v.chunk(parts) for k, v in batch.items()}
    return [{k: c[i] for k, c in chunks.items()} for i in range(parts)]


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


class Trainer:
    """One training run. ``Trainer(cfg).fit()`` runs it to ``cfg.steps``, resuming if asked.

    Under ``torchrun`` each process is one rank: contrastive negatives are gathered from all
    ranks, gradients averaged, and rank 0 alone writes checkpoints and logs.
    """

    def __init__(self, cfg: TrainConfig, env: D.DistEnv | None = None):
        cfg.validate()
        self.cfg = cfg
        self.env = env if env is not None else D.init_distributed()
        self.device = self.env.device
        self.out = Path(cfg.out)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        siglip = cfg.loss == "siglip"
        self.model, self.train_transform, self.eval_transform = create_model_and_transforms(
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
        self.model.to(self.device)
        D.broadcast_parameters(self.model, self.env)
        self.tokenizer = get_tokenizer(cfg.model)
        embed_dim = self.model.clip.text_projection.shape[1] if _has_text_projection(self.model) else None

        rank, world = self.env.rank, self.env.world_size
        if cfg.queue_size:
            self.contrastive = QueueClipLoss(rank, world)
        else:
            self.contrastive = SigLipLoss(rank, world) if siglip else ClipLoss(rank, world)
        self.mlm_loss = MlmLoss(cfg.mlm_weight) if cfg.mlm_weight > 0 else None
        self.ssl_head = self.ssl_loss = None
        if cfg.image_ssl == "simclr":
            dim = embed_dim or self.model.encode_image(torch.zeros(1, 3, self.model.image_size, self.model.image_size)).shape[1]
            self.ssl_head = ProjectionHead(dim).to(self.device)
            self.ssl_loss = SimClrLoss(cfg.ssl_temperature, cfg.image_ssl_weight)
        self.queues = None
        if cfg.queue_size:
            dim = embed_dim or self.model.encode_text(self.tokenizer(["x"])).shape[1]
            self.queues = MomentumQueues(self.model, cfg.queue_size, dim, cfg.momentum).to(self.device)

        params = param_groups(self.model, cfg.weight_decay)
        if self.ssl_head is not None:
            D.broadcast_parameters(self.ssl_head, self.env)
            extra = param_groups(self.ssl_head, cfg.weight_decay)
            params = [{**g, "params": g["params"] + e["params"]} for g, e in zip(params, extra)]
        # fused: one kernel over all parameters (it saved ≈ 2.5 % of a ca-small step on a 2-core CPU)
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=True)
        self.scheduler = warmup_cosine_scheduler(self.optimizer, cfg.warmup, cfg.steps)
        self.step = 0
        self.position = StreamPosition()
        self.skipped: dict[int, dict[str, int]] = {}
        self.skipped_before: dict[str, int] = {}  # counts of the runs this one resumed
        self.nonfinite_steps = 0
        self.nonfinite_in_a_row = 0
        self._tb = None

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
            "rng": _rng_state(),
            "data": {"positions": positions or [asdict(self.position)], "skipped": self.skipped_total()},
        }
        if self.ssl_head is not None:
            state["ssl_head"] = self.ssl_head.state_dict()
        if self.queues is not None:
            state["queues"] = self.queues.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["model_name"] != self.cfg.model:
            raise ResumeMismatchError(f"the checkpoint is for model {state['model_name']!r}, not {self.cfg.model!r}")
        old = state.get("config", {})
        if old.get("loss", "clip") != self.cfg.loss:
            raise ResumeMismatchError(f"the checkpoint was trained with --loss {old.get('loss', 'clip')}")
        had_head = any(k.startswith("mlm_head.") for k in state["model"])
        if had_head != (self.model.mlm_head is not None):
            raise ResumeMismatchError(
                f"the checkpoint was trained {'with' if had_head else 'without'} the MLM head; "
                f"resume with --mlm-weight {'> 0' if had_head else '0'}"
            )
        for key, flag in (("ssl_head", "--image-ssl"), ("queues", "--queue-size")):
            if (key in state) != (getattr(self, key) is not None):
                raise ResumeMismatchError(f"the checkpoint was trained {'with' if key in state else 'without'} {flag}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ssl_head is not None:
            self.ssl_head.load_state_dict(state["ssl_head"])
        if self.queues is not None:
            self.queues.load_state_dict(state["queues"])
        _set_rng_state(state["rng"])
        self.step = state["step"]
        data = state.get("data", {})
        self.skipped_before = dict(data.get("skipped", {}))
        positions = data.get("positions", [])
        if len(positions) == self.env.world_size and old.get("workers") == self.cfg.workers and \
                old.get("batch_size") == self.cfg.batch_size and old.get("seed") == self.cfg.seed:
            pos = positions[self.env.rank]
            self.position = StreamPosition(pos["step"], {int(k): v for k, v in pos["consumed"].items()})
        else:
            # The stream cannot be replayed under other settings: draw a fresh one.
            warnings.warn("the data stream changed (workers, batch size, seed or ranks): it restarts at a new "
                          "seed instead of continuing where the checkpoint stopped", stacklevel=2)
            self.position = StreamPosition(step=self.step)
            self._stream_seed_offset = 7919 * self.step

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

    def _contrastive(self, image: torch.Tensor, text: torch.Tensor, out: dict[str, torch.Tensor],
                     scale_grad: bool = True) -> dict[str, torch.Tensor]:
        """The contrastive loss; ``scale_grad=False`` keeps the temperature (and bias) out of
        the backward pass, for all micro-batches of an accumulated step but one."""
        scale = out["logit_scale"] if scale_grad else out["logit_scale"].detach()
        if self.queues is not None:
            return self.contrastive(image, text, scale, **self.queues.queued())
        extra = ((out["logit_bias"] if scale_grad else out["logit_bias"].detach()),) if self.cfg.loss == "siglip" else ()
        return self.contrastive(image, text, scale, *extra)

    def _mlm_rows(self, n: int) -> int:
        return max(1, math.ceil(self.cfg.mlm_fraction * n))

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Forward, backward and update on one batch; returns the logged scalars.

        Args:
            batch: ``image`` (B, 3, H, W) normalised images, ``text`` (B, L) token ids; with the
                MLM head ``masked_text`` and ``mlm_labels`` (B, L) from ``mask_tokens``; with
                ``--image-ssl simclr`` ``views`` (B, 2, 3, H, W).

        With ``accum_steps`` K > 1 the batch is run as K micro-batches. Their features are
        first computed without gradients, then each micro-batch is recomputed with gradients
        and its loss taken against the whole batch's features (as open_clip's
        ``--accum-freq``), so the gradient equals that of one pass over the whole batch.
        """
        cfg, model = self.cfg, self.model
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        if self.mlm_loss is not None and "masked_text" not in batch:
            batch["masked_text"], batch["mlm_labels"] = self.mask(batch["text"])
        batch = self.drop_padding(batch)
        micro = split_batch(batch, cfg.accum_steps)
        mlm_count = None
        if self.mlm_loss is not None:
            # The MLM loss is a mean over the step's masked tokens, on all micro-batches and ranks.
            local = sum(int((m["mlm_labels"][: self._mlm_rows(len(m["text"]))] != IGNORE_INDEX).sum()) for m in micro)
            mlm_count = D.sum_over_ranks(local, self.env) / self.env.world_size

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
                out = model(mb["image"], mb["text"])
                image, text = out["image_features"], out["text_features"]
                step_features.append((image.detach(), text.detach()))
                if cached is not None:
                    image = torch.cat(cached[0][:j] + [image] + cached[0][j + 1:])
                    text = torch.cat(cached[1][:j] + [text] + cached[1][j + 1:])
                # every micro-batch's loss is the whole batch's: its temperature gradient counts once
                losses = self._contrastive(image, text, out, scale_grad=j == 0)
                if self.mlm_loss is not None:
                    rows = self._mlm_rows(len(mb["text"]))
                    logits, targets = model.mlm_logits(mb["masked_text"][:rows], mb["mlm_labels"][:rows])
                    losses.update(self.mlm_loss(logits, targets, mlm_count))
                    logs["mlm_correct"] += int((logits.argmax(-1) == targets).sum())
                    logs["mlm_total"] += targets.numel()
                if self.ssl_loss is not None:
                    views = mb["views"].flatten(0, 1)  # (2b, 3, H, W): view 1 and 2 of each image
                    z = self.ssl_head(model.encode_image(views, normalize=False).float()).unflatten(0, (-1, 2))
                    ssl = self.ssl_loss(z[:, 0], z[:, 1])
                    losses.update({k: v / len(micro) for k, v in ssl.items()})
            total = sum(v for k, v in losses.items() if k.endswith("_loss"))
            finite = D.all_ranks_agree(bool(torch.isfinite(total)), self.env)
            if not finite:
                break
            total.backward()
            for k, v in losses.items():
                # the contrastive loss is the whole batch's on every micro-batch: count it once
                logs[k] += v.item() / (len(micro) if k == "contrastive_loss" else 1)
        self.optimizer_step(finite)
        if finite and self.queues is not None:
            self._enqueue(batch, step_features)

        logs = dict(logs)
        if not finite:
            logs = {"loss": float("nan")}
        logs["logit_scale"] = out["logit_scale"].item()
        logs["temperature"] = 1.0 / logs["logit_scale"]
        correct, seen = logs.pop("mlm_correct", None), logs.pop("mlm_total", None)
        logs = D.mean_over_ranks(logs, self.env)
        if correct is not None:
            logs["mlm_acc"] = D.sum_over_ranks(correct, self.env) / max(1, D.sum_over_ranks(seen, self.env))
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
        masked, labels = self._masker(texts.cpu(), generator=gen)
        return masked.to(self.device), labels.to(self.device)

    @property
    def _masker(self) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        return functools.partial(mask_tokens, mask_id=self.model.mask_id, eot_id=self.tokenizer.eot_token_id,
                                 random_high=self.tokenizer.sot_token_id, rate=self.cfg.mlm_rate)

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
            if self.queues is not None:
                self.queues.update(self.model)
        self.scheduler.step()
        self.step += 1

    def _enqueue(self, batch: dict[str, torch.Tensor], features: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        if self.queues.ema is None:
            self.queues.push_features(torch.cat([f[0] for f in features]), torch.cat([f[1] for f in features]))
        else:
            with autocast(self.cfg.precision, self.device.type):
                self.queues.push(batch["image"], batch["text"])

    # -- the loop ----------------------------------------------------------------------------
    def fit(self, progress: Callable[..., Any] | None = None) -> dict[str, Any]:
        """Run to ``cfg.steps``; returns a summary. ``progress`` is a tqdm-like factory."""
        cfg = self.cfg
        shards = resolve_shards(cfg.data)
        if not shards:
            raise FileNotFoundError(f"no shards found at {cfg.data}")
        self.out.mkdir(parents=True, exist_ok=True)
        lock = _lock_run(self.out) if self.env.is_main else open(os.devnull)
        with lock:
            resumed_from = None
            if cfg.resume and (latest := ckpt.latest_checkpoint(self.out)) is not None:
                self.load_state_dict(ckpt.load_checkpoint(latest))
                resumed_from = str(latest)
            if self.env.is_main:
                # Steps logged after the checkpoint we resume from (a kill between two
                # checkpoints) are about to be run again: drop their old lines.
                _truncate_metrics(self.out / "metrics.jsonl", self.step)
                (self.out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
            return self._fit(shards, resumed_from, progress if self.env.is_main else None)

    def _pipeline(self, shards: list[str]):
        cfg = self.cfg
        view_transform = None
        if cfg.image_ssl == "simclr":
            visual = self.model.clip.visual
            view_transform = simclr_view_transform(self.model.image_size, getattr(visual, "image_mean", None),
                                                   getattr(visual, "image_std", None))
        masker = None
        if self.mlm_loss is not None:
            masker = self._masker
        return train_pipeline(
            shards,
            transform=self.train_transform,
            tokenizer=self.tokenizer,
            batch_size=cfg.batch_size,
            seed=cfg.seed + getattr(self, "_stream_seed_offset", 0),
            shuffle_buffer=cfg.shuffle_buffer,
            workers=cfg.workers,
            rank=self.env.rank,
            position=self.position,
            view_transform=view_transform,
            masker=masker,
        )

    def _fit(self, shards: list[str], resumed_from: str | None, progress: Callable[..., Any] | None) -> dict[str, Any]:
        cfg = self.cfg
        batches = iter(train_loader(self._pipeline(shards), cfg.workers))
        bar = progress(total=cfg.steps, initial=self.step, unit="step") if progress else None
        first_step, start = self.step, time.perf_counter()
        self.model.train()
        with (self.out / "metrics.jsonl").open("a") if self.env.is_main else open(os.devnull, "w") as metrics, \
                attention_backend(cfg.attention):
            try:
                logs = self._loop(batches, bar, metrics)
            finally:
                if bar is not None:
                    bar.close()
                if self._tb is not None:
                    self._tb.close()
        elapsed = time.perf_counter() - start
        steps_run = self.step - first_step
        return {
            "steps": self.step,
            "steps_this_run": steps_run,
            "resumed_from": resumed_from,
            "seconds": elapsed,
            "samples_per_s": steps_run * cfg.batch_size * self.env.world_size / elapsed if elapsed > 0 else 0.0,
            "final": logs,
            "skipped": self.skipped_total(),
            "nonfinite_steps": self.nonfinite_steps,
            "checkpoint": str(ckpt.latest_checkpoint(self.out)),
        }

    def _loop(self, batches: Iterator, bar: Any, metrics: IO[str]) -> dict[str, float]:
        """Steps until ``cfg.steps``, logging, evaluating and checkpointing on schedule."""
        cfg, logs = self.cfg, {}
        window_start, window_samples = time.perf_counter(), 0
        while self.step < cfg.steps:
            batch, info = next(batches)
            self.skipped[info["role"]] = info["skipped"]
            self.position = self.position.advance(info["role"], info["consumed"])
            logs = self.train_step(batch)
            window_samples += batch["image"].shape[0] * self.env.world_size
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{logs['loss']:.3f}", T=f"{logs['temperature']:.3f}")
            evals = self.evaluate() if cfg.eval_every and self.step % cfg.eval_every == 0 else {}
            if self.step % cfg.log_every == 0 or self.step == cfg.steps or evals:
                now = time.perf_counter()
                record = {
                    "step": self.step,
                    "lr": self.scheduler.get_last_lr()[0],
                    **logs,
                    "samples_per_s": window_samples / (now - window_start),
                    "skipped": self.skipped_total(),
                    "nonfinite_steps": self.nonfinite_steps,
                    **evals,
                }
                self._log(record, metrics)
                window_start, window_samples = time.perf_counter(), 0  # evaluation time is not training time
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                self.save()
        return logs

    def _log(self, record: dict[str, Any], metrics: IO[str]) -> None:
        if not self.env.is_main:
            return
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
        if self.cfg.tensorboard:
            if self._tb is None:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out / "tensorboard"), purge_step=record["step"])
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key if "/" in key else f"train/{key}", value, record["step"])
            self._tb.flush()

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


def _has_text_projection(model: nn.Module) -> bool:
    proj = getattr(model.clip, "text_projection", None)
    return isinstance(proj, torch.Tensor) and proj.ndim == 2
