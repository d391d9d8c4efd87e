"""``clipalign index --embeddings``: the embeddings folder's own model copy is loaded and checked
first, and a bad one is named as it is, before any FAISS index is built."""
from __future__ import annotations

import pathlib
import shutil
from pathlib import Path

import pytest
import torch

from clipalign.cli import main
from clipalign.formats.folders import EmbeddingsFolder
from retrieval.build import build_index_folder
from retrieval.embed import embed_folder
from retrieval.identity import ModelMismatch
from tests.retrieval_toy import make_checkpoint
from tests.toydata import write_toy_shards


class Touch:
    """Unpickled unsafely, creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("build_errors")
    write_toy_shards(root / "shards", n=8, per_shard=8)
    embed_folder(make_checkpoint(root / "checkpoint.pt"), root / "shards", root / "emb", batch_size=8)
    return root / "emb"


@pytest.fixture
def no_build(monkeypatch) -> list:
    """Records any FAISS build; the checks under test come before one."""
    built: list = []
    monkeypatch.setattr("retrieval.build.build_indexes", lambda *a, **k: built.append(a) or pytest.fail("built"))
    return built


def _with_model(embeddings: Path, tmp_path: Path, write) -> Path:
    copy = tmp_path / "emb"
    shutil.copytree(embeddings, copy)
    write(EmbeddingsFolder(copy).model)
    return copy


def test_a_hostile_model_copy_is_named_and_never_runs(embeddings, tmp_path, no_build, capsys):
    marker = tmp_path / "MARKER"
    good = torch.load(EmbeddingsFolder(embeddings).model, weights_only=True)
    copy = _with_model(embeddings, tmp_path, lambda p: torch.save({**good, "payload": Touch(marker)}, p))
    assert main(["index", "--embeddings", str(copy), "--out", str(tmp_path / "index")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(EmbeddingsFolder(copy).model) in lines[0], lines
    assert "not a clipalign checkpoint" in lines[0] and ".tmp-" not in lines[0]
    assert not marker.exists() and not (tmp_path / "index").exists() and no_build == []


def test_a_truncated_model_copy_is_named(embeddings, tmp_path, no_build):
    data = EmbeddingsFolder(embeddings).model.read_bytes()
    copy = _with_model(embeddings, tmp_path, lambda p: p.write_bytes(data[: len(data) // 2]))
    with pytest.raises(ValueError) as err:
        build_index_folder(copy, tmp_path / "index")
    assert str(EmbeddingsFolder(copy).model) in str(err.value) and ".tmp-" not in str(err.value)
    assert not (tmp_path / "index").exists()


def test_a_missing_model_copy_is_named(embeddings, tmp_path, no_build):
    copy = _with_model(embeddings, tmp_path, Path.unlink)
    with pytest.raises(FileNotFoundError, match=str(EmbeddingsFolder(copy).model)):
        build_index_folder(copy, tmp_path / "index")


def test_another_models_weights_are_refused_before_building(embeddings, tmp_path, no_build):
    other = make_checkpoint(tmp_path / "other.pt", seed=1)  # the same architecture, other weights
    copy = _with_model(embeddings, tmp_path, lambda p: shutil.copyfile(other, p))
    with pytest.raises(ModelMismatch, match="not the 'ca-nano'") as err:
        build_index_folder(copy, tmp_path / "index")
    assert str(EmbeddingsFolder(copy).model) in str(err.value)
    assert not (tmp_path / "index").exists()
