"""The ``clipalign`` command: one sub-command per module in this package.

Each sub-command module exposes ``main(argv: list[str] | None) -> int`` and is
imported only when it runs, so the dispatcher itself stays cheap.
"""
from __future__ import annotations

import importlib
import sys

from clipalign.cli.common import CliError

COMMANDS: dict[str, str] = {
    "synth": "generate the embedded synthetic corpus (training manifest + held-out eval sets)",
    "prep": "turn an image-caption manifest or folder into WebDataset shards",
    "train": "train a dual encoder with the contrastive + masked-token objective",
    "plot": "draw a run's training curves as a PNG",
    "eval": "zero-shot classification and retrieval on CLIP_benchmark wds/ sets",
    "classify": "zero-shot classify your own images against class names you give",
    "export": "write a run's model as an open_clip checkpoint + model config",
    "embed": "embed images (and captions) of shards or an image folder into chunked .npy files",
    "index": "build a tuned FAISS index from embeddings (or embed shards on the way)",
    "search": "search an index by text, by image or by a file of queries",
    "serve": "serve an index over HTTP: search API and web page",
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
    module = importlib.import_module(f"clipalign.cli.{name}")
    try:
        return int(module.main(rest) or 0)
    except CliError as err:
        print(f"clipalign {name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"clipalign {name}: interrupted", file=sys.stderr)
        return 130
