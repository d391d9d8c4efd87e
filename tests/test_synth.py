"""Tests for data_prep.synth and ``clipalign synth``."""
from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest

from clipalign.cli.synth import main
from data_prep import scenes, synth
from data_prep.scenes import COLORS, HELD_OUT_PAIRS, SHAPES

N, N_EVAL, N_BAD = 60, 24, 5
RELATIONS = "above|below|to the left of|to the right of|next to"
EVAL_SETS = ("shape_seen", "shape_unseen", "color_seen", "color_unseen", "retrieval")


def _run(out, seed=0, **extra):
    argv = ["--out", str(out), "--n", str(N), "--n-eval", str(N_EVAL), "--seed", str(seed), "--workers", "1"]
    for k, v in extra.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("synth") / "a", n_bad=N_BAD)


def _manifest(root):
    with open(root / "train" / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def _tars(root):
    n = int((root / "test" / "nshards.txt").read_text())
    return [root / "test" / f"{i}.tar" for i in range(n)]


def _named_pairs(caption):
    return {(c, s) for c in COLORS for s in SHAPES if re.search(rf"\b{c} {s}\b", caption)}


def test_held_out_pairs_are_unseen_combinations_of_seen_words():
    seen, held = set(scenes.SEEN_PAIRS), set(HELD_OUT_PAIRS)
    assert not seen & held and seen | held == set(scenes.ALL_PAIRS)
    # one held-out colour per shape, all different: every shape has an unseen-combination test
    assert sorted(s for _, s in held) == sorted(SHAPES) and len({c for c, _ in held}) == len(held)
    # each word of a held-out pair is still trained on, with other words: only the combination is new
    for colour, shape in held:
        assert any(c == colour for c, _ in seen) and any(s == shape for _, s in seen)


def test_scenes_are_valid_and_captions_true():
    rng = np.random.default_rng(0)
    relations = set()
    for _ in range(300):
        scene = scenes.sample_scene(rng, scenes.ALL_PAIRS)
        assert len(scene) in (1, 2)
        if len(scene) == 2:
            a, b = scene
            assert a.position != b.position and (a.color, a.shape) != (b.color, b.shape)
            assert not scenes._overlap(a, b)
        for caption in scenes.caption_options(scene):
            assert _named_pairs(caption) == {(s.color, s.shape) for s in scene}, caption
            assert " a orange" not in f" {caption}"
            m = re.fullmatch(rf"an? (\w+ \w+) ({RELATIONS}) an? (\w+ \w+)", caption)
            if m:
                first, second = (next(s for s in scene if f"{s.color} {s.shape}" == m[i]) for i in (1, 3))
                rel = m[2]
                relations.add(rel)
                (r1, c1), (r2, c2) = scenes._ROW_COL[first.position], scenes._ROW_COL[second.position]
                assert {"above": r1 < r2, "below": r1 > r2, "to the left of": c1 < c2,
                        "to the right of": c1 > c2, "next to": r1 == r2}[rel], caption
    assert relations == {"above", "below", "to the left of", "to the right of", "next to"}


def test_render_is_a_pure_function_of_the_rng():
    scene = scenes.sample_scene(np.random.default_rng(1), scenes.SEEN_PAIRS, n_shapes=2)
    a = scenes.render_scene(scene, np.random.default_rng(5), image_size=32)
    b = scenes.render_scene(scene, np.random.default_rng(5), image_size=32)
    assert a.size == (32, 32) and a.mode == "RGB"
    assert a.tobytes() == b.tobytes()
    # the shape's colour dominates at its centre
    s = scene[0]
    pixel = np.array(a.getpixel((int(s.x * 32), int(s.y * 32))), dtype=float)
    assert np.abs(pixel - scenes.COLOR_RGB[s.color]).max() < 40


def test_layout_and_metadata(corpus):
    info = json.loads((corpus / "synth.json").read_text())
    assert info["seed"] == 0 and info["n_train"] == N and info["n_eval"] == N_EVAL and info["n_bad"] == N_BAD
    assert info["held_out_pairs"] == [list(p) for p in HELD_OUT_PAIRS]
    assert info["splits"]["train"] == {"path": "train/manifest.csv", "images": N, "bad_rows": N_BAD, "rows": N + N_BAD}
    for name in EVAL_SETS:
        root = corpus / "eval" / name
        kind = "retrieval" if name == "retrieval" else "classification"
        assert (root / "dataset_type.txt").read_text().strip() == kind
        assert info["splits"][name]["samples"] == N_EVAL
        assert all(p.exists() for p in _tars(root))
    for name, classes in (("shape", SHAPES), ("color", COLORS)):
        root = corpus / "eval" / f"{name}_seen"
        assert (root / "classnames.txt").read_text().splitlines() == list(classes)
        templates = (root / "zeroshot_classification_templates.txt").read_text().splitlines()
        assert len(templates) >= 3 and all("{c}" in t for t in templates)
        # templates never give the answer away
        other = COLORS if name == "shape" else SHAPES
        assert not any(word in t for t in templates for word in other)


def test_train_manifest_and_held_out_pairs(corpus):
    rows = _manifest(corpus)
    assert len(rows) == N + N_BAD
    good = [r for r in rows if re.fullmatch(r"images/\d{9}\.png", r["image"])]
    assert [r["image"] for r in good] == [f"images/{i:09d}.png" for i in range(N)]
    for row in good:
        assert (corpus / "train" / row["image"]).is_file()
        pairs = _named_pairs(row["caption"])
        assert pairs and not pairs & set(HELD_OUT_PAIRS), row
    bad = [r for r in rows if r not in good]
    kinds = [r["image"].split("/")[1].rsplit("_", 1)[0] for r in bad]
    assert kinds == ["missing", "random_bytes", "truncated_png", "empty_caption", "random_bytes"]
    assert not (corpus / "train" / bad[0]["image"]).exists()
    assert bad[3]["caption"] == ""


@pytest.mark.parametrize("name", ["shape_seen", "shape_unseen", "color_seen", "color_unseen"])
def test_classification_sets_match_their_scenes(corpus, read_shards, name):
    samples = read_shards(_tars(corpus / "eval" / name), decode=False)
    assert len(samples) == N_EVAL
    for i, sample in enumerate(samples):
        image, label, scene = synth.classification_example(0, name, i, 64)
        assert sample["png"] == synth.png_bytes(image)
        assert int(sample["cls"]) == label
        (s,) = scene
        assert label == (SHAPES.index(s.shape) if name.startswith("shape") else COLORS.index(s.color))
        assert ((s.color, s.shape) in HELD_OUT_PAIRS) == name.endswith("unseen")
    labels = {int(s["cls"]) for s in samples}
    assert labels == (set(range(6)) if name.startswith("shape") else {COLORS.index(c) for c, _ in HELD_OUT_PAIRS}
                      if name == "color_unseen" else set(range(8)))


def test_retrieval_set(corpus, read_shards):
    samples = read_shards(_tars(corpus / "eval" / "retrieval"))
    assert len(samples) == N_EVAL
    n_unseen = n_two = 0
    for sample in samples:
        assert sample["png"].size == (64, 64)
        captions = sample["txt"].splitlines()
        assert len(captions) == 2 and captions[0] != captions[1]
        assert _named_pairs(captions[0]) == _named_pairs(captions[1])
        n_unseen += bool(_named_pairs(captions[0]) & set(HELD_OUT_PAIRS))
        n_two += len(_named_pairs(captions[0])) == 2
    assert 0 < n_unseen < N_EVAL and 0 < n_two < N_EVAL


def test_deterministic_for_a_seed(corpus, tmp_path, capsys):
    again = _run(tmp_path / "b", n_bad=N_BAD)
    files = ["synth.json", "train/manifest.csv", "train/images/000000000.png", "train/images/000000059.png",
             "eval/shape_unseen/test/0.tar", "eval/retrieval/test/0.tar"]
    for rel in files:
        assert (again / rel).read_bytes() == (corpus / rel).read_bytes(), rel
    other = _run(tmp_path / "c", seed=1)
    assert (other / "train/manifest.csv").read_bytes() != (corpus / "train/manifest.csv").read_bytes()
    assert (other / "train/images/000000000.png").read_bytes() != (corpus / "train/images/000000000.png").read_bytes()
    assert "held-out pairs" in capsys.readouterr().out


def test_workers_do_not_change_output(tmp_path):
    one = synth.write_train(tmp_path / "w1", n=70, seed=3, workers=1)
    two = synth.write_train(tmp_path / "w2", n=70, seed=3, workers=2)
    assert one == two
    assert (tmp_path / "w1/manifest.csv").read_bytes() == (tmp_path / "w2/manifest.csv").read_bytes()
    assert (tmp_path / "w1/images/000000069.png").read_bytes() == (tmp_path / "w2/images/000000069.png").read_bytes()


def test_cli_rejects_bad_numbers(tmp_path):
    from clipalign.cli import main as clipalign

    assert clipalign(["synth", "--out", str(tmp_path), "--n", "0"]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0


def test_classification_sets_have_a_distinct_train_split_for_linear_probes(corpus):
    root = corpus / "eval" / "shape_seen"
    train = [root / "train" / f"{i}.tar" for i in range(int((root / "train" / "nshards.txt").read_text()))]
    test = _tars(root)
    import webdataset as wds

    def images(tars):
        return [next(v for k, v in s.items() if k.endswith("png")) for s in
                wds.WebDataset([str(t) for t in tars], shardshuffle=False, nodesplitter=lambda s: s)]

    train_images, test_images = images(train), images(test)
    assert len(train_images) == len(test_images) == N_EVAL
    assert not set(train_images) & set(test_images)
