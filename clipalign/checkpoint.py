"""Checkpoints: atomic writes, finding the latest, and rebuilding a model for inference."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch

from clipalign.formats.atomic import replace_file
from clipalign.formats.folders import RunFolder
from clipalign.model import ClipAlign


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """``torch.save`` to a temporary file, then rename: a killed write never leaves a torn file."""
    return replace_file(path, lambda tmp: torch.save(state, tmp))


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return RunFolder(run_dir).checkpoint(step)


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The run's checkpoints, oldest first."""
    folder = RunFolder(run_dir).checkpoints
    found = [p for p in folder.glob("step_*.pt") if RunFolder.checkpoint_step(p) is not None] if folder.is_dir() else []
    return sorted(found, key=RunFolder.checkpoint_step)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (``keep <= 0`` keeps all)."""
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            old.unlink(missing_ok=True)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run folder (its latest checkpoint)."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no checkpoint in run folder {path}")
        return found
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    return torch.load(resolve_checkpoint(path), map_location="cpu", weights_only=False)


def load_model(path: str | os.PathLike) -> tuple[ClipAlign, Callable, Callable, dict[str, Any]]:
    """Rebuild a trained model for inference from a checkpoint file or run folder.

    Returns:
        ``(model in eval mode, eval image transform, tokenizer, checkpoint metadata)``.
    """
    from clipalign.factory import create_model_and_transforms, get_tokenizer

    state = load_checkpoint(path)
    name = state["model_name"]
    has_head = any(k.startswith("mlm_head.") for k in state["model"])
    has_bias = "clip.logit_bias" in state["model"]  # SigLIP-trained
    fusion = {k.split(".")[2] for k in state["model"] if k.startswith("mlm_fusion.blocks.")}
    model, _, eval_tf = create_model_and_transforms(
        name, mlm_head=has_head, mlm_condition="image" if fusion else "none", fusion_layers=max(1, len(fusion)),
        init_logit_bias=0.0 if has_bias else None)
    model.load_state_dict(state["model"])
    model.eval()
    meta = {k: v for k, v in state.items() if k not in ("model", "optimizer", "scheduler", "rng")}
    meta["path"] = str(resolve_checkpoint(path).resolve())
    return model, eval_tf, get_tokenizer(name), meta
