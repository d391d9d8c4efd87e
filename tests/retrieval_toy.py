"""Tiny retrieval fixtures: an untrained ca-nano checkpoint, toy shards, embeddings and an index.

An untrained model embeds consistently, which is all the retrieval plumbing needs: tests
compare results to a plain reference computed with the same model.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from clipalign.checkpoint import save_checkpoint
from clipalign.cli import main
from clipalign.factory import create_model_and_transforms
from tests.toydata import write_toy_shards


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, dim: int, clusters: int = 32, spread: float = 0.3, seed: int = 0) -> np.ndarray:
    """(n, dim) unit vectors around ``clusters`` random centres, like real embeddings."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(clusters, dim)))
    return unit(centres[rng.integers(0, clusters, n)] + spread * rng.normal(size=(n, dim)) / np.sqrt(dim) * 4)


def make_checkpoint(path: Path, seed: int = 0, name: str = "ca-nano") -> Path:
    torch.manual_seed(seed)
    model, _, _ = create_model_and_transforms(name)
    save_checkpoint(path, {"model_name": name, "step": 0, "model": model.state_dict()})
    return path


def make_index(root: Path, n: int = 48, index: str = "auto") -> Path:
    """Shards → ``clipalign embed`` → ``clipalign index``; returns the index folder."""
    ckpt = make_checkpoint(root / "checkpoint.pt")
    write_toy_shards(root / "shards", n=n, per_shard=16)
    assert main(["embed", "--checkpoint", str(ckpt), "--data", str(root / "shards"), "--out", str(root / "emb"),
                 "--no-progress", "--batch-size", "16"]) == 0
    assert main(["index", "--embeddings", str(root / "emb"), "--out", str(root / "index"), "--index", index]) == 0
    return root / "index"
