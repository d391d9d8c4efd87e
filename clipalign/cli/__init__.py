"""The ``clipalign`` command: one sub-command per module in this package.

Each sub-command module exposes ``main(argv: list[str] | None) -> int`` and is
imported only when it runs, so the dispatcher itself stays cheap.

Errors have one surface, here: a ``CliError``, an ``OSError`` (a read-only or full ``--out``,
an unreadable input) or a ``CheckpointError`` (a file that is no loadable checkpoint) is one
line naming the file and the problem, exit status 2; anything else is one line naming the
exception, exit status 1. ``CLIPALIGN_DEBUG=1`` shows the traceback of all but ``CliError``.
Warnings are one line each.
"""
from __future__ import annotations

import importlib
import os
import sys
import warnings

from clipalign.cli.common import CliError

DEBUG_ENV = "CLIPALIGN_DEBUG"  # =1: tracebacks instead of one-line errors

COMMANDS: dict[str, str] = {
    "synth": "generate the embedded synthetic corpus (training manifest + held-out eval sets)",
    "prep": "turn an image-caption manifest or folder into WebDataset shards",
    "train": "train a dual encoder: contrastive + SimCLR by default; masked-token, MAE, queue and caption heads",
    "plot": "draw a run's training curves as a PNG",
    "eval": "zero-shot classification and retrieval on CLIP_benchmark wds/ sets",
    "classify": "zero-shot classify your own images against class names you give",
    "caption": "caption your own images with a CoCa model trained with --caption-weight",
    "export": "write a run's model as an open_clip checkpoint + model config",
    "embed": "embed images (and captions) of shards or an image folder into chunked .npy files",
    "index": "build a tuned FAISS index from embeddings (or embed shards on the way)",
    "search": "search an index by text, by image or by a file of queries",
    "serve": "serve an index over HTTP: search API and web page",
    "checkpoint": "rewrite a checkpoint of an earlier clipalign in the safe form (upgrade)",
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: clipalign <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    lines += ["", "Run 'clipalign <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from clipalign import __version__

        print(f"clipalign {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"clipalign: error: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return _run(name, rest)


def _one_line(text: object) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else ""


def _os_error_line(err: OSError) -> str:
    """``<file>: <strerror>`` (``[Errno 13] Permission denied: '<file>'`` says it less plainly)."""
    if err.filename is None or not err.strerror:
        return _one_line(err)
    where = f"{err.filename} -> {err.filename2}" if err.filename2 is not None else str(err.filename)
    return f"{where}: {err.strerror}"


def _is_checkpoint_error(err: Exception) -> bool:
    # not imported for the test: the dispatcher stays free of torch, and an error of a module never loaded cannot be one
    module = sys.modules.get("clipalign.checkpoint")
    return module is not None and isinstance(err, module.CheckpointError)


def _run(name: str, argv: list[str]) -> int:
    """Run sub-command ``name`` and turn what it raises into one line on stderr and an exit status."""
    debug = os.environ.get(DEBUG_ENV) == "1"
    prefix = f"clipalign {name}"
    format_warning = warnings.formatwarning
    warnings.formatwarning = lambda message, *_, **__: f"{prefix}: warning: {_one_line(message)}\n"
    try:
        module = importlib.import_module(f"clipalign.cli.{name}")
        return int(module.main(argv) or 0)
    except CliError as err:
        print(f"{prefix}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except OSError as err:
        if debug:
            raise
        print(f"{prefix}: error: {_os_error_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:
        if debug:
            raise
        if _is_checkpoint_error(err):
            print(f"{prefix}: error: {_one_line(err)}", file=sys.stderr)
            return 2
        detail = _one_line(err)
        print(f"{prefix}: error: unexpected {type(err).__name__}{': ' + detail if detail else ''} "
              f"(set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = format_warning
