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


def test_prep_eval_set_is_read_by_clip_benchmark_with_the_right_labels(folder, tmp_path):
    from clip_benchmark.datasets.builder import build_wds_dataset

    out = tmp_path / "wds_pets"
    assert main(["prep", str(folder), "--out", str(out), "--eval-set", "classification", "--image-size", "16"]) == 0
    dataset = build_wds_dataset("wds/pets", transform=lambda image: image.size, data_dir=str(out))
    pairs = list(dataset)
    assert dataset.classes == ["cat", "dog"]
    assert sorted(label for _, label in pairs) == [0, 0, 0, 1, 1] and all(size == (16, 16) for size, _ in pairs)


def test_label_manifest_end_to_end_with_a_train_split_for_the_probe(tmp_path, capsys):
    from clipalign import checkpoint as ckpt
    from clipalign.factory import create_model

    rows = [["path", "kind"]]
    for split, n in (("train", 8), ("test", 4)):
        for i in range(n):
            rows.append([str(_img(tmp_path / split / f"{i}.png", 200 if i % 2 else 20)), "light" if i % 2 else "dark"])
    with open(tmp_path / "all.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows + [["", "dark"]])  # one row without an image
    for split in ("train", "test"):
        with open(tmp_path / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows([rows[0]] + [r for r in rows[1:] if f"/{split}/" in r[0]])
        assert main(["prep", str(tmp_path / f"{split}.csv"), "--out", str(tmp_path / "wds"), "--eval-set",
                     "classification", "--split", split, "--image-col", "path", "--label-col", "kind"]) == 0
    ckpt.save_checkpoint(tmp_path / "m.pt", {"model_name": "ca-nano", "step": 0, "model": create_model("ca-nano").state_dict()})
    assert main(["eval", "--checkpoint", str(tmp_path / "m.pt"), "--data", str(tmp_path / "wds"), str(tmp_path / "all.csv"),
                 "--image-col", "path", "--label-col", "kind", "--linear-probe", "--out", str(tmp_path / "r.json"),
                 "--no-progress"]) == 0
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    wds_set, manifest = results["wds"], results["all.csv"]
    assert wds_set["classnames"] == ["dark", "light"] and wds_set["n"] == 4
    assert wds_set["linear_probe"]["n_train"] == 8 and wds_set["metrics"]["lp_acc1"] == 1.0  # dark vs light: trivial
    assert manifest["n"] == 12 and manifest["skipped"] == {"bad_row": 1}
    assert sum(sum(row) for row in manifest["confusion_matrix"]) == 12


def test_blank_class_name_line_and_duplicate_set_names(folder, tmp_path, capsys):
    out = tmp_path / "a" / "val"
    assert main(["prep", str(folder), "--out", str(out), "--eval-set", "classification"]) == 0
    (out / "classnames.txt").write_text("cat\n\ndog\n")
    with pytest.raises(ValueError, match="line 2 is blank"):
        load_eval_set(out)
    (out / "classnames.txt").write_text("cat\ndog\n")
    other = tmp_path / "b" / "val"
    assert main(["prep", str(folder), "--out", str(other), "--eval-set", "classification"]) == 0
    from clipalign import checkpoint as ckpt
    from clipalign.factory import create_model

    ckpt.save_checkpoint(tmp_path / "m.pt", {"model_name": "ca-nano", "step": 0, "model": create_model("ca-nano").state_dict()})
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "m.pt"), "--data", str(out), str(other), "--json",
                 "--no-progress"]) == 0
    assert set(json.loads(capsys.readouterr().out)["results"]) == {"a/val", "b/val"}


def test_an_image_over_the_pixel_limit_is_skipped_in_an_eval_set(folder, tmp_path, capsys):
    from clipalign.formats.images import DEFAULT_MAX_PIXELS

    side = int(DEFAULT_MAX_PIXELS ** 0.5) + 100  # a few hundred KB of PNG, 90 Mpx once decoded
    Image.new("L", (side, side)).save(folder / "dog" / "huge.png")
    out = tmp_path / "wds_pets"
    assert main(["prep", str(folder), "--out", str(out), "--eval-set", "classification", "--image-size", "32"]) == 0
    assert "image_too_large: 1" in capsys.readouterr().out
    assert load_eval_set(out).classnames == ["cat", "dog"]
