"""The whole job, end to end, through the CLI entry points: synth → prep → train → eval → index → search."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from clipalign.cli import main


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    corpus, shards, run = root / "corpus", root / "shards", root / "run"
    assert main(["synth", "--out", str(corpus), "--n", "240", "--n-eval", "24", "--n-bad", "4",
                 "--image-size", "32", "--workers", "1"]) == 0
    assert main(["prep", str(corpus / "train" / "manifest.csv"), "--out", str(shards), "--image-size", "32",
                 "--shard-size", "100"]) == 0
    assert main(["train", "--data", str(shards), "--out", str(run), "--model", "ca-nano", "--steps", "6",
                 "--batch-size", "32", "--warmup", "2", "--workers", "0", "--no-progress"]) == 0
    return root


def test_prep_skipped_the_bad_rows_and_wrote_the_rest(job):
    stats = json.loads((job / "shards" / "stats.json").read_text())
    assert stats["written"] == 240 and stats["skipped"] == 4
    assert len((job / "shards" / "errors.jsonl").read_text().splitlines()) == 4


def test_eval_reports_every_held_out_set(job, capsys):
    sets = sorted(str(p) for p in (job / "corpus" / "eval").iterdir())
    assert main(["eval", "--checkpoint", str(job / "run"), "--data", *sets, "--out", str(job / "eval.json"),
                 "--linear-probe", "--plot", str(job / "plots"), "--no-progress"]) == 0
    table = capsys.readouterr().out
    report = json.loads((job / "eval.json").read_text())
    assert report["step"] == 6 and set(report["results"]) == {p.rsplit("/", 1)[1] for p in sets}
    shape = report["results"]["shape_unseen"]
    assert shape["n"] == 24 and shape["n_classes"] == 6
    confusion = shape["confusion_matrix"]  # rows: true class; the report's numbers must agree with it
    assert sum(map(sum, confusion)) == 24
    assert shape["metrics"]["acc1"] == pytest.approx(sum(confusion[i][i] for i in range(6)) / 24)
    assert "image_retrieval_recall@10" in report["results"]["retrieval"]["metrics"]
    probe = shape["linear_probe"]
    assert probe["n_train"] == 24 and "linear_probe" not in report["results"]["retrieval"]
    assert shape["metrics"]["lp_acc1"] == probe["metrics"]["acc1"]  # CLIP_benchmark's key for the same number
    assert "shape_unseen" in table and "acc@1" in table and "linear probe" in table
    with Image.open(shape["confusion_png"]) as png:  # a real picture, one per classification set
        assert png.format == "PNG" and png.width > 200
    assert sorted(p.name for p in (job / "plots").iterdir()) == sorted(
        f"{n}_confusion.png" for n in ("color_seen", "color_unseen", "shape_seen", "shape_unseen"))


def test_index_and_search_by_text_and_by_image(job, capsys):
    index = job / "index"
    assert main(["index", "--checkpoint", str(job / "run"), "--data", str(job / "shards"), "--out", str(index),
                 "--no-progress"]) == 0
    info = json.loads((index / "info.json").read_text())
    assert info["count"] == 240 and info["model"] == "ca-nano"
    capsys.readouterr()

    # The index carries its own weights: it still works once the run's checkpoints are gone.
    (job / "run").rename(job / "run-moved")
    try:
        assert main(["search", "--index", str(index), "--text", "a red circle", "-k", "3", "--json"]) == 0
    finally:
        (job / "run-moved").rename(job / "run")
    hits = json.loads(capsys.readouterr().out)["results"]
    assert [h["rank"] for h in hits] == [1, 2, 3] and hits[0]["score"] >= hits[-1]["score"]
    assert {"key", "caption", "source", "score"} <= hits[0].keys()

    query = job / "corpus" / "train" / "images" / "000000007.png"
    assert main(["search", "--index", str(index), "--image", str(query), "-k", "1", "--json"]) == 0
    best = json.loads(capsys.readouterr().out)["results"][0]
    assert best["source"].endswith("000000007.png") and best["score"] > 0.99  # an indexed image finds itself

    assert main(["search", "--index", str(index), "--image", str(query), "--over", "captions", "-k", "2"]) == 0
    assert "rank" in capsys.readouterr().out
