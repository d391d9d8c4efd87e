"""Tests for data_prep.evalsets: CLIP_benchmark wds/ classification and retrieval layouts."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from data_prep.evalsets import write_classification_set, write_retrieval_set


def _image(value: int) -> Image.Image:
    return Image.new("RGB", (8, 6), (value, 255 - value, 7))


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    _image(value).save(buf, format="PNG")
    return buf.getvalue()


def _tars(root):
    n = int((root / "test" / "nshards.txt").read_text())
    return [root / "test" / f"{i}.tar" for i in range(n)]


def test_classification_layout_and_round_trip(tmp_path, read_shards):
    root = tmp_path / "cls"
    samples = [(_image(10 * i) if i % 2 else _png(10 * i), i % 3) for i in range(7)]
    n = write_classification_set(root, samples, ["a", "b b", "c"], ["a {c}.", "the {c}."], shard_size=3)
    assert n == 7
    assert (root / "classnames.txt").read_text() == "a\nb b\nc\n"
    assert (root / "zeroshot_classification_templates.txt").read_text() == "a {c}.\nthe {c}.\n"
    assert (root / "dataset_type.txt").read_text().strip() == "classification"
    assert (root / "test" / "nshards.txt").read_text() == "3\n"
    assert sorted(p.name for p in (root / "test").glob("*.tar")) == ["0.tar", "1.tar", "2.tar"]
    got = read_shards(_tars(root))
    assert [s["__key__"] for s in got] == [f"s{i:07d}" for i in range(7)]
    assert [s["cls"] for s in got] == [i % 3 for i in range(7)]
    for i, s in enumerate(got):
        assert s["png"].size == (8, 6)
        assert s["png"].getpixel((0, 0)) == (10 * i, 255 - 10 * i, 7)


def test_retrieval_layout_and_round_trip(tmp_path, read_shards):
    root = tmp_path / "ret"
    samples = [(_image(i), [f"caption {i}", f"another {i}"]) for i in range(4)]
    assert write_retrieval_set(root, samples, image_format="jpg") == 4
    assert (root / "dataset_type.txt").read_text().strip() == "retrieval"
    assert not (root / "classnames.txt").exists()
    got = read_shards(_tars(root))
    assert [s["txt"].splitlines() for s in got] == [[f"caption {i}", f"another {i}"] for i in range(4)]
    assert all(s["jpg"].size == (8, 6) for s in got)


def test_rewrite_removes_stale_shards(tmp_path):
    root = tmp_path / "cls"
    write_classification_set(root, [(_image(0), 0)] * 5, ["x"], ["{c}"], shard_size=2)
    assert len(list((root / "test").glob("*.tar"))) == 3
    write_classification_set(root, [(_image(0), 0)] * 2, ["x"], ["{c}"], shard_size=2)
    assert [p.name for p in (root / "test").glob("*.tar")] == ["0.tar"]
    assert (root / "test" / "nshards.txt").read_text() == "1\n"


@pytest.mark.parametrize(
    "call",
    [
        lambda root: write_classification_set(root, [(_image(0), 0)], ["x"], ["no placeholder"]),
        lambda root: write_classification_set(root, [(_image(0), 3)], ["x"], ["{c}"]),
        lambda root: write_classification_set(root, [(_image(0), 0)], ["x"], ["{c}"], image_format="gif"),
        lambda root: write_retrieval_set(root, [(_image(0), ["two\nlines"])]),
        lambda root: write_retrieval_set(root, [(_image(0), [])]),
        lambda root: write_retrieval_set(root, [(_image(0), "not a list")]),
    ],
)
def test_bad_input_raises(tmp_path, call):
    with pytest.raises(ValueError):
        call(tmp_path / "set")
