"""Small helpers shared by the sub-command modules (no heavy imports here)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog=f"clipalign {prog}",
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )


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
