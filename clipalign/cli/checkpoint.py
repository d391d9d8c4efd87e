"""clipalign checkpoint upgrade: rewrite a checkpoint of an earlier clipalign in the safe form."""
from __future__ import annotations

import argparse
import sys

from clipalign.cli.common import CliError, existing_path, parser

_WHY_TRUST = ("upgrading unpickles the file with weights_only=False, which runs any code it holds: "
              "add --trust only for a checkpoint from a source you trust")


def build_parser() -> argparse.ArgumentParser:
    p = parser("checkpoint", "Work on checkpoint files. clipalign loads checkpoints with "
               "torch.load(weights_only=True): tensors and plain types only, never code. Checkpoints "
               "written by earlier versions pickled NumPy's RNG state and are refused; 'upgrade' "
               "rewrites one in the safe form.")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    up = sub.add_parser("upgrade", help="rewrite a checkpoint of an earlier clipalign so that it loads safely",
                        description="Load PATH with weights_only=False (it runs whatever code the file holds: "
                                    "only for a file you trust) and write it back, atomically, with the NumPy RNG "
                                    "state as plain types. The result loads with weights_only=True and resumes "
                                    "step for step.")
    up.add_argument("path", metavar="PATH", help="checkpoint file to upgrade")
    up.add_argument("--out", default=None, metavar="NEW", help="write the upgraded checkpoint here (default: PATH)")
    up.add_argument("--trust", action="store_true", help="I trust this file: unpickling it may run code")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = existing_path(args.path, "checkpoint")
    if not path.is_file():
        raise CliError(f"{path} is not a file: give the checkpoint file itself")
    if not args.trust:
        raise CliError(f"{path}: not upgraded: {_WHY_TRUST}")
    from clipalign.checkpoint import upgrade_checkpoint

    written = upgrade_checkpoint(path, args.out)
    print(f"upgraded {path} -> {written}", file=sys.stderr)
    return 0
