"""embed → index → search through the CLI: queries files, HTML pages, one-step indexing, model checks."""
import json
import sys
from pathlib import Path

import pytest

from clipalign.cli import main
from clipalign.formats.folders import IndexFolder
from retrieval.index import load_index
from tests.retrieval_toy import make_checkpoint, make_index
from tests.toydata import write_toy_shards


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    return make_index(tmp_path_factory.mktemp("cli"), n=48)


def test_info_names_the_model_and_its_measurements(index):
    info = json.loads(IndexFolder(index).info.read_text())
    assert info["model"] == "ca-nano" and len(info["model_identity"]["weights_sha256"]) == 16
    assert info["count"] == 48 and info["targets"] == ["image", "caption"] and info["index_type"] == "flat"
    assert info["indexes"]["image"]["recall@10"] == 1.0 and IndexFolder(index).model.is_file()


def test_text_search_json(index, capsys):
    assert main(["search", "--index", str(index), "--text", "a red square", "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["results"]
    assert [h["rank"] for h in hits] == [1, 2, 3] and hits[0]["score"] >= hits[-1]["score"]
    assert {"key", "caption", "source", "score", "id"} <= hits[0].keys()


def test_queries_file_gives_one_json_line_per_query(index, tmp_path, capsys):
    (tmp_path / "q.txt").write_text("a red square\n\na blue square\n")
    assert main(["search", "--index", str(index), "--queries", str(tmp_path / "q.txt"), "-k", "2", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [json.loads(x)["query"]["text"] for x in lines] == ["a red square", "a blue square"]


def test_image_to_text_over_captions_and_an_html_page(index, tmp_path, capsys):
    from retrieval.sources import read_image_bytes

    row = load_index(index).rows([9])[0]
    (tmp_path / "q.jpg").write_bytes(read_image_bytes(row))
    page = tmp_path / "results.html"
    assert main(["search", "--index", str(index), "--image", str(tmp_path / "q.jpg"), "--over", "captions",
                 "-k", "4", "--html", str(page)]) == 0
    out = capsys.readouterr().out
    assert "cosine" in out and "square" in out
    html = page.read_text()
    assert html.count("data:image/jpeg;base64,") == 4 and "src=\"http" not in html  # self-contained


def test_a_foreign_model_is_refused(index, tmp_path, capsys):
    other = make_checkpoint(tmp_path / "other.pt", seed=1)
    assert main(["search", "--index", str(index), "--text", "x", "--checkpoint", str(other)]) == 2
    assert "built with model 'ca-nano'" in capsys.readouterr().err
    tiny = make_checkpoint(tmp_path / "tiny.pt", name="ca-tiny")
    assert main(["search", "--index", str(index), "--text", "x", "--checkpoint", str(tiny)]) == 2
    assert "128 dimensions" in capsys.readouterr().err


def test_one_step_index_and_adding_embeddings(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "m.pt")
    write_toy_shards(tmp_path / "a", n=20, per_shard=10, seed=0)
    write_toy_shards(tmp_path / "b", n=12, per_shard=12, seed=1)
    assert main(["index", "--checkpoint", str(ckpt), "--data", str(tmp_path / "a"), "--out", str(tmp_path / "idx"),
                 "--no-progress"]) == 0
    assert load_index(tmp_path / "idx").info["count"] == 20
    # with its progress bar, as users (and the demo) run it
    assert main(["embed", "--checkpoint", str(ckpt), "--data", str(tmp_path / "b"), "--out", str(tmp_path / "emb")]) == 0
    assert main(["index", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "idx"), "--add"]) == 0
    index = load_index(tmp_path / "idx")
    assert index.info["count"] == index.indexes["image"].ntotal == index.indexes["caption"].ntotal == 32
    other = make_checkpoint(tmp_path / "o.pt", seed=3)
    assert main(["embed", "--checkpoint", str(other), "--data", str(tmp_path / "b"), "--out", str(tmp_path / "emb2"),
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["index", "--embeddings", str(tmp_path / "emb2"), "--out", str(tmp_path / "idx"), "--add"]) == 2
    assert "built with model" in capsys.readouterr().err


def test_an_index_over_budget_is_refused(tmp_path, index, capsys):
    emb = index.parent / "emb"
    assert main(["index", "--embeddings", str(emb), "--out", str(tmp_path / "x"), "--index", "flat",
                 "--max-memory", "1K"]) == 2
    assert "raise --max-memory" in capsys.readouterr().err


def _full_model_hits(index, text: str, k: int = 10) -> list[dict]:
    """The plain reference: the query embedded by the torch model itself, then searched."""
    import torch

    from retrieval.engine import open_engine

    engine = open_engine(index)
    model, _, tokenizer = engine.full_model()
    with torch.no_grad():
        want = model.encode_text(tokenizer([text]), normalize=True).numpy()
    return engine.index.search(want, k)[0]


def _same_hits(got: list[dict], want: list[dict]) -> bool:
    return ([h["id"] for h in got] == [h["id"] for h in want]
            and max(abs(g["score"] - w["score"]) for g, w in zip(got, want)) <= 1e-5)


def test_text_search_in_a_fresh_process_imports_no_torch_and_matches_the_full_model(index):
    import subprocess
    import sys

    assert json.loads(IndexFolder(index).info.read_text())["text_query"]["file"] == IndexFolder(index).text_query.name
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "clipalign", "search", "--index", str(index),
                           "--text", "a red square", "--json"], capture_output=True, text=True, check=True)
    imported = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "onnxruntime" in imported and not imported & {"torch", "open_clip", "torchvision"}
    assert _same_hits(json.loads(done.stdout)["results"], _full_model_hits(index, "a red square"))


def test_without_onnxruntime_text_search_takes_the_full_model(index, monkeypatch, capsys):
    from retrieval.engine import open_engine

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    assert open_engine(index)._text_query is None
    assert main(["search", "--index", str(index), "--text", "a red square", "--json"]) == 0
    assert _same_hits(json.loads(capsys.readouterr().out)["results"], _full_model_hits(index, "a red square"))


def test_an_older_folder_with_a_torchscript_tower_takes_the_full_model(index, tmp_path, capsys):
    import shutil

    from retrieval.engine import open_engine

    copy = IndexFolder(shutil.copytree(index, tmp_path / "idx"))
    copy.text_query.rename(copy.legacy_text_query)  # as folders before the ONNX tower held it
    info = json.loads(copy.info.read_text())
    info["text_query"]["file"] = copy.legacy_text_query.name
    info["files"][copy.legacy_text_query.name] = info["files"].pop(copy.text_query.name)
    copy.info.write_text(json.dumps(info))
    assert open_engine(copy.root)._text_query is None
    assert main(["search", "--index", str(copy.root), "--text", "a red square", "--json"]) == 0
    assert _same_hits(json.loads(capsys.readouterr().out)["results"], _full_model_hits(index, "a red square"))


def test_without_the_fast_path_text_search_uses_the_full_model(index, tmp_path, capsys):
    import shutil

    copy = tmp_path / "idx"
    shutil.copytree(index, copy)
    IndexFolder(copy).text_query.unlink()
    info = json.loads(IndexFolder(copy).info.read_text())  # as older folders wrote it: the model copy named
    IndexFolder(copy).info.write_text(json.dumps({**info, "checkpoint": IndexFolder(copy).model.name}))
    assert main(["search", "--index", str(index), "--text", "a red square", "--json"]) == 0
    fast = json.loads(capsys.readouterr().out)["results"]
    assert main(["search", "--index", str(copy), "--text", "a red square", "--json"]) == 0
    assert _same_hits(json.loads(capsys.readouterr().out)["results"], fast)


def test_the_index_folder_is_written_whole_with_its_info_written_once_and_last(index, tmp_path, monkeypatch):
    import os

    out = IndexFolder(tmp_path / "idx")
    assert main(["index", "--embeddings", str(index.parent / "emb"), "--out", str(out.root), "--index", "flat"]) == 0
    old = json.loads(out.info.read_text())
    written = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (written.append(Path(dst)), real_replace(src, dst)))
    assert main(["index", "--embeddings", str(index.parent / "emb"), "--out", str(out.root), "--index", "flat"]) == 0
    names = [p.name for p in written]
    assert names.count(out.info.name) == 1 and names[-1] == out.info.name
    assert all(p.parent != out.root for p in written)  # every file was written beside, in the new version
    files = {out.model.name, out.text_query.name, out.image_query.name, out.metadata.name, out.faiss("image").name}
    assert files <= set(os.listdir(out.root))
    info = json.loads(out.info.read_text())
    assert info["text_query"]["file"] == out.text_query.name and info["image_query"]["file"] == out.image_query.name
    assert info["files"] == old["files"]  # the exports too are byte-stable
    assert set(info["files"]) == files | {out.faiss("caption").name}
    assert sorted(p.name for p in out.root.parent.iterdir()) == [out.root.name]


def test_adding_the_same_embeddings_twice_adds_them_once(index, tmp_path, capsys):
    import shutil

    write_toy_shards(tmp_path / "b", n=12, per_shard=12, seed=1)
    ckpt = str(IndexFolder(index).model)
    assert main(["embed", "--checkpoint", ckpt, "--data", str(tmp_path / "b"), "--out", str(tmp_path / "emb"),
                 "--no-progress"]) == 0
    copy = shutil.copytree(index, tmp_path / "idx")
    for _ in range(2):
        assert main(["index", "--embeddings", str(tmp_path / "emb"), "--out", str(copy), "--add"]) == 0
    err = capsys.readouterr().err
    assert "added 12 vectors" in err and "added 0 vectors" in err and "skipped 12 already in the index" in err
    grown = load_index(copy)
    assert grown.info["count"] == grown.indexes["caption"].ntotal == grown.table.num_rows == 48 + 12
    # the one-step form: embedding the same images again adds nothing either
    assert main(["index", "--checkpoint", ckpt, "--data", str(tmp_path / "b"), "--out", str(copy), "--add",
                 "--no-progress"]) == 0
    assert "skipped 12" in capsys.readouterr().err and load_index(copy).info["count"] == 60
