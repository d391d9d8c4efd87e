"""Atomic file writes: write a temporary file beside the target, then rename it into place.

A killed process never leaves a torn file behind: readers see the old version or the new one.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable


def replace_file(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)``, then rename the result onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    return replace_file(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))
