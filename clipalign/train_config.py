"""``TrainConfig``: every setting of a training run, its command-line help, and all its checks.

Each field's ``metadata`` carries what the command line shows (``help``, ``choices``), so
``clipalign train``'s flags are generated from this dataclass and cannot disagree with it.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, fields
from typing import Any

from clipalign.data import resolve_shards
from clipalign.factory import list_models
from clipalign.formats import evalset
from clipalign.formats.folders import RunFolder
from clipalign.image_ssl import IMAGE_SSL
from clipalign.masking import MLM_TARGETS
from clipalign.model import MLM_CONDITIONS
from clipalign.precision import PRECISIONS, resolve_precision

CONTRASTIVE_LOSSES = ("clip", "siglip")
ATTENTION_BACKENDS = ("math", "auto")
_RUN = RunFolder("RUN")  # names the run folder's files in help texts


def _arg(default: Any = dataclasses.MISSING, help: str | None = None, **meta: Any) -> Any:
    """A field with its command-line ``help`` and extra metadata (``choices``, ``what``, ``positive``,
    ``metavar``).

    ``what`` names the setting in the "unknown ..." error of a field with ``choices``;
    ``positive`` makes ``validate`` refuse values <= 0. A bool field that defaults to True
    becomes a ``--no-<name>`` flag, so its help says what that flag does.
    """
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class TrainConfig:
    """Everything that defines a run; saved as the run folder's config and in every checkpoint."""

    data: str = _arg(help="shard folder, glob, brace pattern (a/{00000..00009}.tar)")
    out: str = _arg(help="run folder")
    model: str = _arg("ca-tiny", "model config name (see clipalign.list_models())")
    pretrained: str | None = _arg(None, "local open_clip checkpoint, or local Hugging Face CLIPModel folder of "
                                  "--model's architecture, to start from")
    lock_image: bool = _arg(False, "freeze the image tower (LiT; use with --pretrained)")
    lock_text: bool = _arg(False, "freeze the text tower")
    patch_dropout: float | None = _arg(None, "fraction of image patches dropped in training (FLIP; ViT towers)")
    grad_checkpointing: bool = _arg(False, "recompute activations in backward to save memory")
    loss: str = _arg("clip", "contrastive objective: softmax InfoNCE (CLIP) or the sigmoid loss (SigLIP)",
                     choices=CONTRASTIVE_LOSSES, what="loss")
    steps: int = _arg(1000, "total optimizer steps", positive=True)
    batch_size: int = _arg(128, positive=True)
    lr: float = _arg(5e-4, "peak learning rate")
    weight_decay: float = _arg(0.1)
    betas: tuple[float, float] = _arg((0.9, 0.98), "AdamW betas", metavar=("BETA1", "BETA2"))
    eps: float = _arg(1e-6, "AdamW epsilon")
    warmup: int = _arg(100, "linear warmup steps before cosine decay")
    grad_clip: float = _arg(1.0, "max gradient norm (0: off)")
    precision: str = _arg(
        "auto", "bf16 autocast is about 2x faster where bf16 is native (AVX-512 BF16 or AMX CPUs, GPUs) and "
        "many times slower where it is emulated; 'auto' picks bf16 only where native",
        choices=("auto", *PRECISIONS), what="precision")
    attention: str = _arg("math", "kernels of the attention torch runs (cross-attention in the fusion "
                          "head and CoCa's decoder; the towers' self-attention is clipalign's own): 'math' "
                          "forces the plain ones (faster training on CPU), 'auto' lets torch pick", choices=ATTENTION_BACKENDS, what="attention backend")
    workers: int = _arg(1, "data loader processes")
    shuffle_buffer: int = _arg(2000, "sample shuffle buffer")
    accum_steps: int = _arg(1, "split each batch into this many micro-batches (less memory; negatives stay the "
                            "whole batch)")
    # off by default: on real held-out data no masked-token objective beat contrastive-only
    # (README, "Ablation on real data"); 0.1 is the weight the ablation tried
    mlm_weight: float = _arg(0.0, "weight of the masked-token (MLM) loss on the text tower; 0: off (the "
                             "default: README's ablation on real data), 0.1 is the tried weight")
    mlm_rate: float = _arg(0.15, "fraction of caption tokens masked")
    mlm_fraction: float = _arg(1.0, "run the MLM pass on this fraction of each batch (cheaper steps)")
    mlm_condition: str = _arg("none", "'image': the masked caption is predicted with the image in view (its token "
                              "states cross-attend to the image tower's tokens through a training-only fusion "
                              "head; the MLM gradient reaches both towers); 'none': from the text alone",
                              choices=MLM_CONDITIONS, what="MLM condition")
    fusion_layers: int = _arg(1, "cross-attention blocks of the --mlm-condition image fusion head", positive=True)
    mlm_target: str = _arg("any", "'content': mask only words not in a fixed stop-word list (names, colours, "
                           "places); 'any': any caption token, BERT-style", choices=MLM_TARGETS, what="MLM target")
    caption_weight: float = _arg(0.0, "weight of CoCa's captioning loss (GPT-style next-token prediction from the "
                                 "image; models with a captioning decoder, e.g. ca-coca-nano; 0: off)")
    # SimCLR on by default: on both real held-out corpora it beat contrastive-only at equal samples
    # (README, "Ablation on real data": cross-style emoji R@10 67.7 vs 57.4, OpenClipart 23.2 vs 20.8,
    # zero-shot no worse), for about 2.6x a contrastive-only step on CPU; --image-ssl none turns it off
    image_ssl: str = _arg("simclr", "image self-supervised objective beside the contrastive loss: 'simclr' "
                          "(the default: it won README's ablation on real data), SimCLR on two augmented views "
                          "(SLIP), about 2.6x the cost of a contrastive-only step on CPU; 'mae', reconstruct the "
                          "patches --patch-dropout hid from the same ViT pass (MAE); 'none': contrastive-only",
                          choices=IMAGE_SSL, what="image objective")
    image_ssl_weight: float = _arg(0.5, "weight of the image objective (0.5: the weight the ablation chose)")
    ssl_temperature: float = _arg(0.1, "SimCLR temperature")
    queue_size: int = _arg(0, "MoCo-style queue of this many past image/text features used as extra negatives "
                           "(0: off)")
    momentum: float = _arg(0.995, "EMA momentum of the encoders that fill the queue (0: queue the step's own "
                           "features)")
    eval_sets: tuple[str, ...] = _arg((), "comma-separated wds/ evaluation sets to score during training")
    eval_every: int = _arg(0, "steps between evaluations (0: none)")
    tensorboard: bool = _arg(True, f"do not write TensorBoard logs ({_RUN.tensorboard})")
    seed: int = _arg(0)
    log_every: int = _arg(10, f"steps between {_RUN.metrics.name} lines", positive=True)
    checkpoint_every: int = _arg(200, positive=True)
    keep_checkpoints: int = _arg(2, "0 keeps all")
    max_nonfinite_steps: int = _arg(10, "a non-finite loss skips the update; this many in a row stop the run",
                                    positive=True)
    resume: bool = _arg(False, "continue from the latest checkpoint in --out")

    def __post_init__(self) -> None:
        if self.image_ssl is None:  # older code and run folders' configs said None for "no image objective"
            self.image_ssl = "none"

    def validate(self, paths: bool = True) -> None:
        """Raise ``ValueError`` naming the first inconsistent setting.

        Args:
            paths: also check that ``data`` holds shards and each of ``eval_sets`` is a
                ``wds/`` set (off for a trainer built to run steps on batches it is given).
        """
        if self.model not in list_models():
            raise ValueError(f"unknown model {self.model!r}; known: {', '.join(list_models()[:8])}, ...")
        if paths and not resolve_shards(self.data):
            raise ValueError(f"no shards found at {self.data}")
        if self.patch_dropout is not None and not 0 <= self.patch_dropout < 1:
            raise ValueError("--patch-dropout must be in [0, 1)")
        for f in fields(self):
            if f.metadata.get("positive") and getattr(self, f.name) <= 0:
                raise ValueError(f"{flag(f.name)} must be positive")
        if paths:
            for root in self.eval_sets:
                if not evalset.is_eval_set(root):
                    missing = evalset.nshards_file(root).relative_to(root)
                    raise ValueError(f"--eval-sets: {root} is not a wds/ evaluation set (no {missing})")
        for f in fields(self):
            value, choices = getattr(self, f.name), f.metadata.get("choices")
            if choices and value not in choices:
                raise ValueError(f"unknown {f.metadata['what']} {value!r} (one of {', '.join(choices)})")
        if self.accum_steps < 1 or self.batch_size % self.accum_steps:
            raise ValueError(f"--accum-steps must divide --batch-size ({self.batch_size}), got {self.accum_steps}")
        if not 0 < self.mlm_fraction <= 1:
            raise ValueError("--mlm-fraction must be in (0, 1]")
        if self.queue_size and self.loss != "clip":
            raise ValueError("--queue-size works with --loss clip")
        if self.queue_size < 0 or not 0 <= self.momentum < 1:
            raise ValueError("--queue-size must be >= 0 and --momentum in [0, 1)")
        if self.image_ssl == "mae" and not (self.patch_dropout or 0) > 0:
            raise ValueError("--image-ssl mae needs --patch-dropout (e.g. 0.5): the dropped patches are its targets")
        if self.mlm_weight <= 0 and (self.mlm_condition != "none" or self.mlm_target != "any"):
            raise ValueError("--mlm-condition and --mlm-target need the MLM loss (--mlm-weight > 0)")
        if self.eval_every and not self.eval_sets:
            raise ValueError("--eval-every needs --eval-sets")

    def resolved(self) -> TrainConfig:
        """This config with ``precision="auto"`` made concrete: bf16 where it runs natively on
        the device this process trains on (CUDA if there is one, else the CPU), else fp32."""
        if self.precision != "auto":
            return self
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        return dataclasses.replace(self, precision=resolve_precision(self.precision, device))


def flag(name: str) -> str:
    """The command-line flag of a ``TrainConfig`` field: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def field_types() -> dict[str, Any]:
    """Each field's type, its annotation evaluated (``str | None``, ``tuple[float, float]``, ...)."""
    return typing.get_type_hints(TrainConfig)
