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


