"""Small helpers shared by the sub-command modules (no heavy imports here)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def default_workers() -> int:
    """Processes for a CPU-bound command: this process's usable cores, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 8))


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog=f"clipalign {prog}",
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )


def add_progress_arg(p: argparse.ArgumentParser) -> None:
    """``--no-progress``, on every command that runs long (bars go to stderr, on a terminal only)."""
    p.add_argument("--no-progress", action="store_true", help="no progress bar (one is drawn only on a terminal)")


def add_engine_args(p: argparse.ArgumentParser, ray_does: str, *, embeds: bool = False) -> None:
    """``--engine``, ``--ray-address`` and, where images are embedded, ``--num-gpus`` and ``--actors``;
    ``ray_does``: what ``--engine ray`` does in this command, for its help."""
    g = p.add_argument_group("engine", "where the work runs: this machine, or a Ray cluster ('pip install "
                             "clipalign[ray]'; every node must see the input, the model and --out at the same paths)")
    g.add_argument("--engine", choices=["local", "ray"], default="local", help=f"'ray': {ray_does}")
    g.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                   help="the Ray cluster to join; None: $RAY_ADDRESS if set, else a Ray started on this machine")
    if embeds:
        g.add_argument("--num-gpus", type=float, default=0, help="GPUs per embedding actor (0: on CPUs)")
        g.add_argument("--actors", type=int, default=None,
                       help="embedding actors; None: as many as the cluster's CPUs (or GPUs) hold")


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments ``add_engine_args``'s flags give the library; CliError where Ray is missing."""
    if args.engine == "ray":
        from clipalign.cluster import RAY_MISSING

        try:
            import ray  # noqa: F401
        except ImportError:
            raise CliError(RAY_MISSING) from None
    options: dict[str, Any] = {"engine": args.engine, "ray_address": args.ray_address}
    if hasattr(args, "num_gpus"):
        if args.num_gpus < 0 or (args.actors is not None and args.actors < 1):
            raise CliError("--num-gpus must be >= 0 and --actors >= 1")
        options |= {"num_gpus": args.num_gpus, "actors": args.actors}
    return options


def read_templates(path: str | os.PathLike) -> list[str]:
    """Prompt templates, one per non-blank line, each with ``{c}`` where the class name goes."""
    templates = [t.strip() for t in existing_path(path, "templates file").read_text().splitlines() if t.strip()]
    if not templates or any("{c}" not in t for t in templates):
        raise CliError(f"{path}: every template needs {{c}} where the class name goes")
    return templates


def existing_path(path: str | os.PathLike, what: str) -> Path:
    """Return ``path`` as a Path, or raise CliError if it does not exist."""
    p = Path(path)
    if not p.exists():
        raise CliError(f"{what} not found: {p}")
    return p


def add_model_args(p: argparse.ArgumentParser, *, checkpoint: str | None = "checkpoint file, or a run folder "
                   "(its latest checkpoint)") -> None:
    """The flags naming a model: ``--checkpoint`` (help ``checkpoint``; none when None), ``--model`` and
    ``--pretrained`` (``clipalign.model_source.ModelSource``)."""
    g = p.add_argument_group("model", "a clipalign checkpoint, or pretrained CLIP weights you have on disk "
                             "(nothing is downloaded)")
    if checkpoint is not None:
        g.add_argument("--checkpoint", default=None, help=checkpoint)
    g.add_argument("--model", default=None, metavar="NAME|CONFIG.json",
                   help="open_clip architecture (clipalign.list_models()) or open_clip model config JSON of --pretrained")
    g.add_argument("--pretrained", default=None, metavar="FILE|HF_DIR",
                   help="open_clip state dict or checkpoint file (with --model), or a Hugging Face CLIPModel "
                        "folder (--model optional)")


def model_source_of(args: argparse.Namespace, *, required: bool = True, checkpoint: str | None = None):
    """The ``ModelSource`` the parsed ``add_model_args`` flags name (``checkpoint`` overrides
    ``--checkpoint``, for a positional one), or None when none is given and none is ``required``;
    ``CliError`` for a combination that names no one model, a missing checkpoint or a download tag."""
    from clipalign.model_source import ModelSource

    checkpoint = checkpoint if checkpoint is not None else getattr(args, "checkpoint", None)
    if checkpoint is None and args.model is None and args.pretrained is None:
        if required:
            raise CliError("no model: give --checkpoint RUN, or --model NAME --pretrained FILE, "
                           "or --pretrained HF_FOLDER")
        return None
    if checkpoint is not None and args.model is None and args.pretrained is None:
        existing_path(checkpoint, "checkpoint")
    try:
        return ModelSource(checkpoint=checkpoint, model=args.model, pretrained=args.pretrained)
    except ValueError as err:
        raise CliError(str(err)) from None
