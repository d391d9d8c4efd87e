"""Files ``torch.save`` writes, judged without running them: their first bytes, and the globals
their pickle would import (read from the pickle's opcodes, never unpickled).

``clipalign.checkpoint`` (clipalign's checkpoints) and ``clipalign.factory`` (open_clip
weights given as ``--pretrained``) both say from these why a file does not load.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

ZIP_MAGIC = b"PK\x03\x04"  # torch.save has written zip archives since torch 1.6
PICKLE_PROTO = b"\x80"  # the PROTO opcode a pickle (torch.save's format before 1.6) starts with


def file_head(path: str | os.PathLike) -> bytes:
    """The first bytes of ``path``, as many as ``ZIP_MAGIC`` (fewer for a shorter file)."""
    with Path(path).open("rb") as handle:
        return handle.read(len(ZIP_MAGIC))


def is_torch_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts as a file ``torch.save`` writes: a zip archive or a pickle."""
    head = file_head(path)
    return head == ZIP_MAGIC or head[:1] == PICKLE_PROTO


def unsafe_globals(path: str | os.PathLike) -> list[str]:
    """The globals (``module.name``) the pickle in a ``torch.save`` file would import beyond
    what ``weights_only`` allows; empty where the file cannot be read that way."""
    try:
        return sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path))))
    except Exception:  # an unreadable pickle: nothing more to say than that it was refused
        return []


def refused_objects(names: list[str]) -> str:
    """Why ``weights_only`` refused a file whose pickle names the globals ``names``."""
    if not names:
        return "it holds objects other than tensors and plain types"
    return f"it would import {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"
