"""User evaluation data: ImageFolder trees and label manifests, evaluated directly or written as wds/ sets."""
import csv
import json

import numpy as np
import pytest
from PIL import Image

from clipalign.cli import main
from clipalign.evaluate import load_eval_set
from data_prep.labelled import image_folder, label_manifest


def _img(path, value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((40, 50, 3), value, np.uint8)).save(path)
    return path


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "pets"
    for name, n in (("dog", 2), ("cat", 3)):
        for i in range(n):
            _img(root / name / f"{i}.png", 40 * i)
    (root / "cat" / "broken.png").write_bytes(b"not a png")
    (root / "cat" / "README.txt").write_text("ignored")
    return root


def test_image_folder_classes_are_sorted_sub_folders(folder):
    labelled = image_folder(folder)
    assert labelled.classnames == ["cat", "dog"]
    assert [(p.parent.name, label) for p, label in labelled.items].count(("cat", 0)) == 4  # 3 + broken
    assert sum(1 for _, label in labelled.items if label == 1) == 2


def test_label_manifest_classes_and_bad_rows(tmp_path):
    _img(tmp_path / "a.png")
    _img(tmp_path / "b.png")
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "label"], ["a.png", "zebra"], ["b.png", "ant"], ["c.png", ""]])
    labelled = label_manifest(tmp_path / "labels.csv")
    assert labelled.classnames == ["ant", "zebra"]
    assert [(p.name, label) for p, label in labelled.items] == [("a.png", 1), ("b.png", 0)]
    assert len(labelled.bad_rows) == 1


def test_prep_eval_set_classification_round_trips_through_load_eval_set(folder, tmp_path, capsys):
    out = tmp_path / "wds_pets"
    assert main(["prep", str(folder), "--out", str(out), "--eval-set", "classification", "--image-size", "32"]) == 0
    assert "skipped: undecodable_image: 1" in capsys.readouterr().out
    assert (out / "dataset_type.txt").read_text().strip() == "classification"
    evalset = load_eval_set(out)
    assert evalset.classnames == ["cat", "dog"] and all("{c}" in t for t in evalset.templates)
    assert (out / "test" / "nshards.txt").read_text().strip() == "1"


def test_prep_eval_set_retrieval_groups_captions_by_image(tmp_path):
    _img(tmp_path / "a.png")
    _img(tmp_path / "b.png")
    rows = [{"image": "a.png", "caption": "a grey square"}, {"image": "b.png", "caption": "another one"},
            {"image": "a.png", "caption": "the same   image\\tagain"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "wds_ret"
    assert main(["prep", str(tmp_path / "m.jsonl"), "--out", str(out), "--eval-set", "retrieval"]) == 0
    evalset = load_eval_set(out)
    assert evalset.task == "retrieval"
    import webdataset as wds

    samples = list(wds.WebDataset(evalset.shards, shardshuffle=False, nodesplitter=lambda s: s))
    assert [s["txt"].decode().splitlines() for s in samples] == [["a grey square", "the same image\\tagain"], ["another one"]]


def test_eval_reads_image_folders_directly(folder, tmp_path):
    from clipalign import checkpoint as ckpt
    from clipalign.factory import create_model

    ckpt.save_checkpoint(tmp_path / "m.pt", {"model_name": "ca-nano", "step": 0, "model": create_model("ca-nano").state_dict()})
    assert main(["eval", "--checkpoint", str(tmp_path / "m.pt"), "--data", str(folder), "--out", str(tmp_path / "r.json"),
                 "--no-progress"]) == 0
    result = json.loads((tmp_path / "r.json").read_text())["results"]["pets"]
    assert result["n"] == 5 and result["skipped"] == {"undecodable_image": 1}
    assert len(result["confusion_matrix"]) == 2 and sum(map(sum, result["confusion_matrix"])) == 5
