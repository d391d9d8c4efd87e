"""What the real-corpus recipes (``real_emoji.py``, ``openclipart.py``) share: one-line errors,
CSV manifests, and ``clipalign prep`` run through the project's own CLI."""
from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class BuildError(Exception):
    """Bad input or a failed step: reported as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        """One line, exit status 2 (argparse would print the usage first)."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def write_csv(path: Path, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *rows])


def prep(*args: str) -> str:
    """Run ``clipalign prep`` from the repository (pass absolute paths) and return its last line.

    Raises:
        BuildError: prep failed; the message ends with prep's own last line.
    """
    done = subprocess.run([sys.executable, "-m", "clipalign", "prep", *args], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise BuildError(f"clipalign prep {args[0]} failed (exit {done.returncode}): {last}")
    return (done.stdout.strip().splitlines() or [""])[-1]
