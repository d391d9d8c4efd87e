"""clipalign train: contrastive training (with SimCLR, masked-token and other objectives) on WebDataset shards.

Its flags are generated from ``TrainConfig``'s fields (name, type, default, help, choices),
so the command line and the library cannot disagree.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from typing import TYPE_CHECKING, Any, Callable

from clipalign.cli.common import CliError, add_progress_arg, parser

if TYPE_CHECKING:
    from clipalign.train_config import TrainConfig


def _comma_separated(item: Callable[[str], Any]) -> Callable[[str], tuple]:
    """An argparse ``type``: ``"a,b"`` -> ``(item("a"), item("b"))``, ``""`` -> ``()``."""
    def parse(text: str) -> tuple:
        return tuple(item(s) for s in text.split(",") if s)

    return parse


def _add_field(p: argparse.ArgumentParser, f: dataclasses.Field, kind: Any) -> None:
    """One ``TrainConfig`` field of type ``kind`` as a flag.

    Bools become ``--x`` (default False) or ``--no-x`` (default True), ``X | None`` takes an X,
    ``tuple[X, ...]`` a comma-separated list and ``tuple[X, X]`` two values.
    """
    from clipalign.train_config import flag

    help_text = f.metadata.get("help")
    if kind is bool:
        if f.default:
            p.add_argument(f"--no-{flag(f.name)[2:]}", dest=f.name, action="store_false", help=help_text)
        else:
            p.add_argument(flag(f.name), action="store_true", help=help_text)
        return
    kw: dict[str, Any] = {"help": help_text, "choices": f.metadata.get("choices"), "metavar": f.metadata.get("metavar")}
    if f.default is dataclasses.MISSING:
        kw["required"] = True
    else:
        kw["default"] = f.default
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    args = typing.get_args(kind)
    if typing.get_origin(kind) is tuple and args[-1] is Ellipsis:
        # typed "a,b"; a string default, so that --help shows it as typed (argparse parses it too)
        kw.update(type=_comma_separated(args[0]), default=",".join(map(str, f.default)))
    elif typing.get_origin(kind) is tuple:
        kw.update(type=args[0], nargs=len(args))
    else:
        kw["type"] = kind
    p.add_argument(flag(f.name), **kw)


def build_parser() -> argparse.ArgumentParser:
    """``clipalign train``'s flags: one per ``TrainConfig`` field, ``--no-progress`` and ``--system-malloc``."""
    from clipalign.formats.folders import RunFolder
    from clipalign.train_config import TrainConfig, field_types

    run = RunFolder("")
    p = parser("train", "Train a dual encoder with symmetric InfoNCE plus, by default, SimCLR on the image "
               "tower (SLIP; --image-ssl none for contrastive-only), streaming WebDataset shards; a "
               "masked-token (MLM) loss on the text tower is an option. Writes checkpoints, "
               f"{run.config.name} and {run.metrics.name} into --out; --resume continues from the "
               "latest checkpoint.")
    hints = field_types()
    for f in dataclasses.fields(TrainConfig):
        _add_field(p, f, hints[f.name])
    add_progress_arg(p)
    p.add_argument("--system-malloc", action="store_true",
                   help="leave the C library's malloc as it is. By default the trainer keeps freed memory for "
                        "the next step instead of handing it back to the system and faulting it in again "
                        "(a quarter of the page faults; 6-7 %% faster in runs taken in turn on a 2-core CPU), so "
                        "the process holds its peak memory")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` of parsed arguments, unchecked."""
    from clipalign.train_config import TrainConfig

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def build_config(argv: list[str] | None = None) -> tuple[argparse.Namespace, TrainConfig]:
    """The parsed arguments and the run's checked ``TrainConfig``, its precision resolved;
    ``CliError`` on bad input."""
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    try:
        cfg.validate()
    except ValueError as err:
        raise CliError(str(err)) from None
    return args, cfg.resolved()


def main(argv: list[str] | None = None) -> int:
    args, cfg = build_config(argv)
    from tqdm import tqdm

    from clipalign.data import DataStreamError
    from clipalign.distributed import finish_distributed
    from clipalign.memory import keep_freed_memory
    from clipalign.resume import ResumeMismatchError
    from clipalign.run_folder import RunLockedError
    from clipalign.train import NonFiniteLossError, Trainer

    if not args.system_malloc:
        keep_freed_memory(largest=True)  # before the loader's workers fork: they keep theirs too
    try:
        trainer = Trainer(cfg)
    except (FileNotFoundError, ValueError) as err:
        raise CliError(str(err)) from None
    try:
        summary = trainer.fit(progress=None if args.no_progress else tqdm)
    except (FileNotFoundError, RunLockedError, ResumeMismatchError, DataStreamError, NonFiniteLossError) as err:
        finish_distributed(trainer.env, wait=False)
        raise CliError(str(err)) from None
    finish_distributed(trainer.env)
    if not trainer.env.is_main:
        return 0
    final = summary["final"]
    if summary["steps_this_run"] == 0:
        print(f"{args.out} is already at step {summary['steps']} of {args.steps}: nothing to train "
              "(raise --steps to go further)", file=sys.stderr)
    else:
        print(
            f"trained {summary['steps']} steps ({summary['steps_this_run']} this run) in {summary['seconds']:.0f} s, "
            f"{summary['samples_per_s']:.0f} samples/s ({100 * summary['data_wait_frac']:.0f} % of it waiting for data); "
            f"loss {final['loss']:.3f}"
            + (f", mlm acc {final['mlm_acc']:.2f}" if "mlm_acc" in final else ""),
            file=sys.stderr,
        )
    if summary["skipped"]:
        print(f"skipped samples: {json.dumps(summary['skipped'])}", file=sys.stderr)
    print(f"checkpoint: {summary['checkpoint']}", file=sys.stderr)
    return 0
