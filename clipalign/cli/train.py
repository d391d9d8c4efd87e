"""clipalign train: contrastive + masked-token training on WebDataset shards."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from clipalign.cli.common import CliError, parser

if TYPE_CHECKING:
    from clipalign.train import TrainConfig


def build_parser():
    from clipalign.train import TrainConfig

    d = TrainConfig(data="", out="")
    p = parser("train", "Train a dual encoder with symmetric InfoNCE plus a masked-token (MLM) loss "
               "on the text tower, streaming WebDataset shards. Writes checkpoints, config.json and "
               "metrics.jsonl into --out; --resume continues from the latest checkpoint.")
    p.add_argument("--data", required=True, help="shard folder, glob, brace pattern (a/{00000..00009}.tar)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--model", default=d.model, help="model config name (see clipalign.list_models())")
    p.add_argument("--pretrained", default=None, help="local open_clip checkpoint to start from")
    p.add_argument("--lock-image", action="store_true", help="freeze the image tower (LiT; use with --pretrained)")
    p.add_argument("--lock-text", action="store_true", help="freeze the text tower")
    p.add_argument("--patch-dropout", type=float, default=None,
                   help="fraction of image patches dropped in training (FLIP; ViT towers)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward to save memory")
    p.add_argument("--steps", type=int, default=d.steps, help="total optimizer steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup", type=int, default=d.warmup, help="linear warmup steps before cosine decay")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm (0: off)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="bf16 autocast is about 2x faster where bf16 is native (AVX-512 BF16 or AMX CPUs, "
                        "GPUs) and many times slower where it is emulated; 'auto' picks bf16 only where native")
    p.add_argument("--attention", choices=["math", "auto"], default=d.attention,
                   help="'math' forces plain attention kernels (faster training on CPU); 'auto' lets torch pick")
    p.add_argument("--workers", type=int, default=d.workers, help="data loader processes")
    p.add_argument("--shuffle-buffer", type=int, default=d.shuffle_buffer, help="sample shuffle buffer")
    p.add_argument("--loss", choices=["clip", "siglip"], default=d.loss,
                   help="contrastive objective: softmax InfoNCE (CLIP) or the sigmoid loss (SigLIP)")
    p.add_argument("--mlm-weight", type=float, default=d.mlm_weight, help="weight of the MLM loss (0: off)")
    p.add_argument("--mlm-rate", type=float, default=d.mlm_rate, help="fraction of caption tokens masked")
    p.add_argument("--mlm-fraction", type=float, default=d.mlm_fraction,
                   help="run the MLM pass on this fraction of each batch (cheaper steps)")
    p.add_argument("--image-ssl", choices=["simclr"], default=None,
                   help="add an image self-supervised objective: SimCLR on two augmented views (SLIP)")
    p.add_argument("--image-ssl-weight", type=float, default=d.image_ssl_weight, help="weight of the image objective")
    p.add_argument("--ssl-temperature", type=float, default=d.ssl_temperature, help="SimCLR temperature")
    p.add_argument("--queue-size", type=int, default=d.queue_size,
                   help="MoCo-style queue of this many past image/text features used as extra negatives (0: off)")
    p.add_argument("--momentum", type=float, default=d.momentum,
                   help="EMA momentum of the encoders that fill the queue (0: queue the step's own features)")
    p.add_argument("--accum-steps", type=int, default=d.accum_steps,
                   help="split each batch into this many micro-batches (less memory; negatives stay the whole batch)")
    p.add_argument("--eval-sets", default="", help="comma-separated wds/ evaluation sets to score during training")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between evaluations (0: none)")
    p.add_argument("--no-tensorboard", dest="tensorboard", action="store_false",
                   help="do not write TensorBoard logs (RUN/tensorboard)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--log-every", type=int, default=d.log_every, help="steps between metrics.jsonl lines")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints, help="0 keeps all")
    p.add_argument("--max-nonfinite-steps", type=int, default=d.max_nonfinite_steps,
                   help="a non-finite loss skips the update; this many in a row stop the run")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def build_config(argv: list[str] | None = None) -> tuple[argparse.Namespace, TrainConfig]:
    """The parsed arguments and the run's checked ``TrainConfig``; ``CliError`` on bad input."""
    args = build_parser().parse_args(argv)
    import torch

    from clipalign.data import resolve_shards
    from clipalign.factory import list_models
    from clipalign.precision import resolve_precision
    from clipalign.train import TrainConfig

    if args.model not in list_models():
        raise CliError(f"unknown model {args.model!r}; known: {', '.join(list_models()[:8])}, ...")
    if not resolve_shards(args.data):
        raise CliError(f"no shards found at {args.data}")
    if args.patch_dropout is not None and not 0 <= args.patch_dropout < 1:
        raise CliError("--patch-dropout must be in [0, 1)")
    for name in ("steps", "batch_size", "log_every", "checkpoint_every", "max_nonfinite_steps"):
        if getattr(args, name) <= 0:
            raise CliError(f"--{name.replace('_', '-')} must be positive")
    options = {k: v for k, v in vars(args).items() if k != "no_progress"}
    options["eval_sets"] = tuple(s for s in args.eval_sets.split(",") if s)
    options["precision"] = resolve_precision(args.precision, "cuda" if torch.cuda.is_available() else "cpu")
    for root in options["eval_sets"]:
        if not (Path(root) / "test" / "nshards.txt").is_file():
            raise CliError(f"--eval-sets: {root} is not a wds/ evaluation set (no test/nshards.txt)")
    cfg = TrainConfig(**options)
    try:
        cfg.validate()
    except ValueError as err:
        raise CliError(str(err)) from None
    return args, cfg


def main(argv: list[str] | None = None) -> int:
    args, cfg = build_config(argv)
    from tqdm import tqdm

    from clipalign.data import DataStreamError
    from clipalign.train import NonFiniteLossError, ResumeMismatchError, RunLockedError, Trainer

    try:
        trainer = Trainer(cfg)
    except (FileNotFoundError, ValueError) as err:
        raise CliError(str(err)) from None
    try:
        summary = trainer.fit(progress=None if args.no_progress else tqdm)
    except (FileNotFoundError, RunLockedError, ResumeMismatchError, DataStreamError, NonFiniteLossError) as err:
        raise CliError(str(err)) from None
    if not trainer.env.is_main:
        return 0
    final = summary["final"]
    if summary["steps_this_run"] == 0:
        print(f"{args.out} is already at step {summary['steps']} of {args.steps}: nothing to train "
              "(raise --steps to go further)", file=sys.stderr)
    else:
        print(
            f"trained {summary['steps']} steps ({summary['steps_this_run']} this run) in {summary['seconds']:.0f} s, "
            f"{summary['samples_per_s']:.0f} samples/s; loss {final['loss']:.3f}"
            + (f", mlm acc {final['mlm_acc']:.2f}" if "mlm_acc" in final else ""),
            file=sys.stderr,
        )
    if summary["skipped"]:
        print(f"skipped samples: {json.dumps(summary['skipped'])}", file=sys.stderr)
    print(f"checkpoint: {summary['checkpoint']}", file=sys.stderr)
    (trainer.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0
