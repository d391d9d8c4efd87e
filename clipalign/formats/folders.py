"""What a run folder, an embeddings folder and an index folder hold: their file names, in one place.

Each layout is a small frozen dataclass over the folder's root; the library function that
writes a folder and every reader of it go through these paths, never through literals.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

MODEL_COPY = "model.pt"  # the weights an embeddings or index folder's vectors were made with


@dataclass(frozen=True)
class _Folder:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))  # accept str and PathLike roots


@dataclass(frozen=True)
class RunFolder(_Folder):
    """A training run: ``config.json``, ``metrics.jsonl``, ``summary.json``, ``.lock``,
    ``tensorboard/`` and ``checkpoints/step_XXXXXXXX.pt``."""

    STEP_FILE = re.compile(r"step_(\d+)\.pt")  # the whole name

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:08d}.pt"

    @classmethod
    def checkpoint_step(cls, path: str | os.PathLike) -> int | None:
        """The step of a checkpoint file name, or ``None`` if it is not one."""
        found = cls.STEP_FILE.fullmatch(Path(path).name)
        return int(found.group(1)) if found else None


@dataclass(frozen=True)
class EmbeddingsFolder(_Folder):
    """``embeddings.json``, ``model.pt``, and per unit ``img_emb/N.npy``, ``text_emb/N.npy``,
    ``metadata/N.parquet`` and ``done/N.json`` (written last: the unit is complete)."""

    @property
    def info(self) -> Path:
        return self.root / "embeddings.json"

    @property
    def model(self) -> Path:
        return self.root / MODEL_COPY

    def image_vectors(self, unit: str) -> Path:
        return self.root / "img_emb" / f"{unit}.npy"

    def text_vectors(self, unit: str) -> Path:
        return self.root / "text_emb" / f"{unit}.npy"

    def metadata(self, unit: str) -> Path:
        return self.root / "metadata" / f"{unit}.parquet"

    def done(self, unit: str) -> Path:
        return self.root / "done" / f"{unit}.json"


@dataclass(frozen=True)
class IndexFolder(_Folder):
    """``info.json``, ``metadata.arrow`` (or the older ``metadata.jsonl``), one ``<target>.faiss``
    per embedded target (``image``, ``caption``), ``model.pt`` and the optional ``text_query.onnx`` and
    ``image_query.onnx`` (the towers that answer text and image queries; folders before them held
    ``text_query.ts``)."""

    @property
    def info(self) -> Path:
        return self.root / "info.json"

    @property
    def metadata(self) -> Path:
        return self.root / "metadata.arrow"

    @property
    def legacy_metadata(self) -> Path:
        return self.root / "metadata.jsonl"

    @property
    def model(self) -> Path:
        return self.root / MODEL_COPY

    @property
    def text_query(self) -> Path:
        return self.root / "text_query.onnx"

    @property
    def image_query(self) -> Path:
        return self.root / "image_query.onnx"

    @property
    def legacy_text_query(self) -> Path:
        """The TorchScript text tower of older folders: named in their info, never read."""
        return self.root / "text_query.ts"

    def faiss(self, target: str) -> Path:
        return self.root / f"{target}.faiss"
