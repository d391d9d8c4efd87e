"""Manifest readers: every input format streams the same records; extra columns are carried."""
from __future__ import annotations

import csv
import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clipalign.cli.prep import main
from data_prep.coco import read_coco
from data_prep.manifest import ManifestError, make_record, open_records

ROWS = [
    {"image": "a.png", "caption": "first", "license": "cc0", "width": 10},
    {"image": "sub/b.png", "caption": "second", "license": "cc-by", "width": 20},
    {"image": "https://example.com/c.jpg", "caption": "third", "license": "cc0", "width": 30},
]


def _write(path, kind):
    opener = gzip.open if path.suffix == ".gz" else open
    if kind == "parquet":
        buf = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(ROWS), buf)
        with opener(path, "wb") as f:
            f.write(buf.getvalue().to_pybytes())
    elif kind == "jsonl":
        with opener(path, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in ROWS)
    else:
        with opener(path, "wt", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(ROWS[0]), delimiter="\t" if kind == "tsv" else ",")
            w.writeheader()
            w.writerows(ROWS)
    return path


@pytest.mark.parametrize(
    "name", ["m.csv", "m.csv.gz", "m.tsv", "m.tsv.gz", "m.jsonl", "m.jsonl.gz", "m.parquet", "m.parquet.gz"]
)
def test_formats_give_the_same_records(tmp_path, name):
    kind = name.split(".")[1]
    records = list(open_records(_write(tmp_path / name, kind), extra_cols=None))
    assert [r.source for r in records] == [r["image"] for r in ROWS]
    assert [r.caption for r in records] == ["first", "second", "third"]
    assert records[0].path == tmp_path / "a.png" and records[0].url is None
    assert records[2].url == "https://example.com/c.jpg" and records[2].path is None
    widths = [r.extra["width"] for r in records]
    assert widths == ([10, 20, 30] if kind in ("jsonl", "parquet") else ["10", "20", "30"])
    assert [r.extra["license"] for r in records] == ["cc0", "cc-by", "cc0"]
    picked = list(open_records(tmp_path / name, extra_cols=["license"]))
    assert picked[1].extra == {"license": "cc-by"}
    assert all(r.extra is None for r in open_records(tmp_path / name))  # the library default carries none
    if kind != "jsonl":
        with pytest.raises(ManifestError, match="nope"):
            open_records(tmp_path / name, extra_cols=["nope"])
    with pytest.raises(ManifestError, match="'text'"):
        open_records(tmp_path / name, caption_col="text")


def test_url_schemes(tmp_path):
    img = tmp_path / "x y.png"
    assert make_record(0, tmp_path, img.as_uri(), "c").path == img
    assert make_record(0, tmp_path, "HTTP://h/x.png", "c").url == "HTTP://h/x.png"
    bad = make_record(0, tmp_path, "ftp://h/x.png", "c")
    assert bad.error == "bad_row" and "ftp" in bad.detail


def _coco(tmp_path):
    (tmp_path / "imgs").mkdir()
    for name, colour in (("1.jpg", "red"), ("2.jpg", "blue"), ("3.jpg", "green")):
        Image.new("RGB", (20, 16), colour).save(tmp_path / "imgs" / name)
    data = {
        "images": [{"id": 2, "file_name": "2.jpg"}, {"id": 1, "file_name": "1.jpg"}, {"id": 3, "file_name": "3.jpg"}],
        "annotations": [
            {"id": 11, "image_id": 1, "caption": "A red  square."},
            {"id": 10, "image_id": 1, "caption": "red &amp; bright"},
            {"id": 12, "image_id": 2, "caption": "blue"},
        ],
    }
    path = tmp_path / "annotations" / "captions_val.json"
    path.parent.mkdir()
    path.write_text(json.dumps(data))
    return path


def test_coco_caption_modes(tmp_path):
    path = _coco(tmp_path)
    root = tmp_path / "imgs"
    every = list(read_coco(path, image_root=root, caption_mode="all"))
    assert [r.source for r in every] == ["1.jpg", "2.jpg", "3.jpg"]
    assert every[0].captions == ("red &amp; bright", "A red  square.") and every[0].caption == "red &amp; bright"
    assert every[2].caption is None and every[0].path == root / "1.jpg" and every[1].extra == {"image_id": 2}
    first = list(read_coco(path, image_root=root, caption_mode="first"))
    assert [r.caption for r in first] == ["red &amp; bright", "blue", None] and first[0].captions is None
    each = list(read_coco(path, image_root=root, caption_mode="each"))
    assert [(r.index, r.source, r.caption) for r in each] == [
        (0, "1.jpg", "red &amp; bright"), (1, "1.jpg", "A red  square."), (2, "2.jpg", "blue"), (3, "3.jpg", None)]
    with pytest.raises(ManifestError):
        read_coco(tmp_path / "imgs" / "1.jpg")


def test_coco_through_the_cli(tmp_path, read_shards):
    path = _coco(tmp_path)
    out = tmp_path / "out"
    assert main([str(path), "--out", str(out), "--image-root", str(tmp_path / "imgs"), "--image-size", "8"]) == 0
    samples = read_shards([out / "00000.tar"])
    assert [s["txt"] for s in samples] == ["red & bright\nA red square.", "blue"]
    assert samples[0]["json"]["captions"] == ["red & bright", "A red square."]
    assert samples[0]["json"]["image_id"] == 1
    assert json.loads((out / "stats.json").read_text())["skipped_by_reason"] == {"missing_caption": 1}
    out2 = tmp_path / "out2"
    assert main([str(path), "--out", str(out2), "--image-root", str(tmp_path / "imgs"), "--image-size", "8",
                 "--caption-mode", "each"]) == 0
    assert [s["txt"] for s in read_shards([out2 / "00000.tar"])] == ["red & bright", "A red square.", "blue"]
    out3 = tmp_path / "out3"  # tokenised: one row of ids per caption, for the trainer to draw from
    assert main([str(path), "--out", str(out3), "--image-root", str(tmp_path / "imgs"), "--image-size", "8",
                 "--tokenize", "ca-nano"]) == 0
    tokens = [s["tok.npy"] for s in read_shards([out3 / "00000.tar"])]
    assert tokens[0].shape == (2, 32) and tokens[1].shape == (32,)
    assert (tokens[0][0] != tokens[0][1]).any()


def test_folder_is_recursive_and_sorted(tmp_path):
    for rel in ("b/z.png", "a.png", "b/c/y.jpg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / rel)
        (tmp_path / rel).with_suffix(".txt").write_text(f" {rel} \n")
    records = list(open_records(tmp_path))
    assert [(r.source, r.caption) for r in records] == [("a.png", "a.png"), ("b/c/y.jpg", "b/c/y.jpg"),
                                                         ("b/z.png", "b/z.png")]


def test_gzipped_parquet_is_decompressed_to_a_file_closed_after_reading(tmp_path):
    path = _write(tmp_path / "m.parquet.gz", "parquet")
    list(open_records(path))  # pyarrow's own first-use files
    fds = len(os.listdir("/proc/self/fd"))
    records = open_records(path)
    assert len(os.listdir("/proc/self/fd")) == fds + 1
    assert len(list(records)) == len(ROWS)
    assert len(os.listdir("/proc/self/fd")) == fds


def test_unknown_types_are_refused(tmp_path):
    (tmp_path / "m.json.gz").write_bytes(b"")
    (tmp_path / "m.txt").write_text("x")
    for name in ("m.json.gz", "m.txt"):
        with pytest.raises(ManifestError, match="unknown manifest type"):
            open_records(tmp_path / name)
    (tmp_path / "bad.parquet").write_text("not parquet")
    (tmp_path / "bad.parquet.gz").write_text("not gzip")
    with gzip.open(tmp_path / "bad2.parquet.gz", "wt") as f:
        f.write("gzip, but not parquet")
    for name in ("bad.parquet", "bad.parquet.gz", "bad2.parquet.gz"):
        with pytest.raises(ManifestError, match="Parquet"):
            open_records(tmp_path / name)
