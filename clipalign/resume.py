"""Resuming a run from its checkpoint: what it must hold, whether it fits this run, the RNGs,
and where the data stream continues."""
from __future__ import annotations

import random
import warnings
from typing import Any

import numpy as np
import torch

from clipalign.data import StreamPosition
from clipalign.model import ClipAlign
from clipalign.objectives import Objectives
from clipalign.train_config import TrainConfig

# A stream that cannot be replayed restarts at seed + RESEED_STRIDE * step: a prime, so that
# seed falls neither on a neighbouring run's seed (seed + 1, ...) nor on the seed of a restart
# at another step, for any two seeds closer than it.
RESEED_STRIDE = 7919
TRAINING_STATE = ("step", "config", "optimizer", "scheduler", "rng")  # what a resume needs beside the weights


class ResumeMismatchError(ValueError):
    """The run to resume was trained with a structurally different model."""


def _plain_numpy_state(state: tuple) -> dict[str, Any]:
    """NumPy's RNG state tuple as plain types: its own form holds an ndarray, which a
    ``weights_only`` load refuses."""
    name, key, pos, has_gauss, gauss = state
    return {"bit_generator": str(name), "key": [int(k) for k in key], "pos": int(pos), "has_gauss": int(has_gauss),
            "gauss": float(gauss)}


def rng_state() -> dict[str, Any]:
    """The torch, Python and NumPy RNG states, for a checkpoint: tensors and plain types only."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": _plain_numpy_state(np.random.get_state())}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` saved."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["bit_generator"], np.asarray(n["key"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["gauss"]))


def upgrade_rng_state(state: dict[str, Any]) -> dict[str, Any]:
    """An earlier version's ``rng_state`` (NumPy's state as its own tuple) in today's form."""
    if isinstance(state.get("numpy"), tuple):
        return {**state, "numpy": _plain_numpy_state(state["numpy"])}
    return state


def check_resumable(state: dict[str, Any], cfg: TrainConfig, model: ClipAlign, objectives: Objectives) -> None:
    """Raise ``ResumeMismatchError`` unless a checkpoint's ``state`` loads into this run's modules."""
    if state["model_name"] != cfg.model:
        raise ResumeMismatchError(f"the checkpoint is for model {state['model_name']!r}, not {cfg.model!r}")
    old = state.get("config", {})
    if old.get("loss", "clip") != cfg.loss:
        raise ResumeMismatchError(f"the checkpoint was trained with --loss {old.get('loss', 'clip')}")
    had_head = any(k.startswith("mlm_head.") for k in state["model"])
    if had_head != (model.mlm_head is not None):
        raise ResumeMismatchError(
            f"the checkpoint was trained {'with' if had_head else 'without'} the MLM head; "
            f"resume with --mlm-weight {'> 0' if had_head else '0'}"
        )
    had_fusion = any(k.startswith("mlm_fusion.") for k in state["model"])
    if had_fusion != (model.mlm_fusion is not None):
        raise ResumeMismatchError(f"the checkpoint was trained with --mlm-condition {'image' if had_fusion else 'none'}")
    for key, flag, off in (("ssl_head", "--image-ssl simclr", "--image-ssl none"),
                           ("mae_decoder", "--image-ssl mae", "--image-ssl none"), ("queues", "--queue-size", "--queue-size 0")):
        if (key in state) != (key in objectives.stateful()):
            had = key in state
            raise ResumeMismatchError(f"the checkpoint was trained {'with' if had else 'without'} {flag}; "
                                      f"resume with {flag if had else off}")


def resume_stream(state: dict[str, Any], cfg: TrainConfig, rank: int = 0,
                  world_size: int = 1) -> tuple[StreamPosition, int]:
    """Where this rank's data stream continues after the checkpoint ``state``, and its seed.

    The stream replays from the checkpoint's position when it was drawn with the same
    workers, batch size, seed and number of ranks; otherwise (with a warning) a fresh stream
    starts at the checkpoint's step, seeded ``cfg.seed + RESEED_STRIDE * step``.
    """
    old, step = state.get("config", {}), state["step"]
    positions = state.get("data", {}).get("positions", [])
    if len(positions) == world_size and old.get("workers") == cfg.workers and \
            old.get("batch_size") == cfg.batch_size and old.get("seed") == cfg.seed:
        pos = positions[rank]
        return StreamPosition(pos["step"], {int(k): v for k, v in pos["consumed"].items()}), cfg.seed
    warnings.warn("the data stream changed (workers, batch size, seed or ranks): it restarts at a new "
                  "seed instead of continuing where the checkpoint stopped", stacklevel=3)
    return StreamPosition(step=step), cfg.seed + RESEED_STRIDE * step
