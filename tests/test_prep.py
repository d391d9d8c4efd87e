"""Tests for ``clipalign prep`` and the stages it composes (manifest, images, shards, prep)."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from clipalign.cli import main as clipalign
from clipalign.cli.prep import main
from data_prep.images import decode_image, process_image, resize_image, to_rgb
from data_prep.manifest import ManifestError, open_records
from data_prep.prep import PrepConfig, run_prep
from data_prep.sample import SampleConfig
from data_prep.shards import ShardSink

# (image path, caption, what to put at the path)
ROWS = [
    ("a.png", "a red thing", ("RGB", (40, 30))),
    ("b.jpg", "a tall, blue thing", ("RGB", (30, 50))),
    ("corrupt.png", "broken", "corrupt"),
    ("sub/c.webp", "  a thing in a sub folder  ", ("RGB", (64, 64))),
    ("missing.png", "not there", None),
    ("d.png", "   ", ("RGB", (10, 10))),
    ("e.png", "see-through", ("RGBA", (20, 20))),
]
GOOD = [0, 1, 3, 6]
EXPECTED_REASONS = {2: "undecodable_image", 4: "missing_image", 5: "empty_caption"}


def _make_image(path, spec, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    if spec == "corrupt":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + np.random.default_rng(seed).bytes(100))
        return
    mode, size = spec
    arr = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], len(mode)), dtype=np.uint8)
    if mode == "RGBA":
        arr[..., 3] = 0  # fully transparent
    Image.fromarray(arr, mode).save(path)


def _write_manifest(path, rows, kind, image_col="image", caption_col="caption"):
    if kind == "jsonl":
        path.write_text("".join(json.dumps({"id": i, image_col: im, caption_col: cap}) + "\n"
                                for i, (im, cap) in enumerate(rows)))
        return
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t" if kind == "tsv" else ",")
        writer.writerow(["id", image_col, caption_col])
        writer.writerows([i, im, cap] for i, (im, cap) in enumerate(rows))


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "data"
    for i, (name, _, spec) in enumerate(ROWS):
        if spec is not None:
            _make_image(root / name, spec, i)
    return root


def _manifest(data, kind="csv"):
    path = data / f"manifest.{kind}"
    _write_manifest(path, [(name, cap) for name, cap, _ in ROWS], kind)
    return path


def _shards(out):
    return [out / name for name in json.loads((out / "sizes.json").read_text())]


def test_round_trip(data, tmp_path, read_shards, capsys):
    out = tmp_path / "out"
    assert main([str(_manifest(data)), "--out", str(out), "--image-size", "32", "--shard-size", "3"]) == 0
    # shard i holds the good samples of rows [3i, 3i + 3)
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 2, "00001.tar": 1, "00002.tar": 1}
    samples = read_shards(_shards(out))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in GOOD]
    for s, i in zip(samples, GOOD):
        name, caption, (_, (w, h)) = ROWS[i]
        assert s["txt"] == caption.strip()
        assert s["jpg"].size == (32, 32) and s["jpg"].mode == "RGB"
        digest = hashlib.sha256((data / name).read_bytes()).hexdigest()
        assert s["json"] == {"key": f"{i:09d}", "source": name, "caption": caption.strip(), "width": 32,
                             "height": 32, "original_width": w, "original_height": h, "sha256": digest, "id": str(i)}
    assert "wrote 4 samples in 3 shard(s)" in capsys.readouterr().out


def test_bad_samples_are_skipped_counted_and_listed(data, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(_manifest(data)), "--out", str(out), "--image-size", "16"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["seen"], stats["written"], stats["skipped"], stats["shards"]) == (7, 4, 3, 1)
    assert stats["by_status"] == {"success": 4, "failed": 3}
    assert stats["skipped_by_reason"] == {"empty_caption": 1, "missing_image": 1, "undecodable_image": 1}
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert {e["index"]: e["reason"] for e in errors} == EXPECTED_REASONS
    assert all(e["key"] == f"{e['index']:09d}" and e["source"] == ROWS[e["index"]][0] and e["detail"] for e in errors)
    summary = capsys.readouterr().out
    assert "skipped 3 (empty_caption: 1, missing_image: 1, undecodable_image: 1)" in summary


def test_the_rate_counts_the_samples_this_run_wrote(data, tmp_path):
    out, config = tmp_path / "out", PrepConfig(SampleConfig(image_size=16))
    stats = run_prep(open_records(_manifest(data)), out, config, clock=iter([10.0, 12.5]).__next__)
    assert stats["duration_s"] == 2.5 and stats["samples_per_s"] == round(4 / 2.5, 1)
    again = run_prep(open_records(_manifest(data)), out, config, clock=iter([0.0, 1.0]).__next__)
    assert again["resumed_shards"] == 1 and again["written"] == 4 and again["samples_per_s"] == 0.0  # none new


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl", "folder"])
def test_input_kinds(data, tmp_path, read_shards, kind):
    if kind == "folder":
        for name, caption, spec in ROWS:
            if spec is not None:
                (data / name).with_suffix(".txt").write_text(caption)
        source = data
    else:
        source = _manifest(data, kind)
    out = tmp_path / "out"
    assert main([str(source), "--out", str(out), "--image-size", "16", "--format", "png"]) == 0
    samples = read_shards(_shards(out))
    assert sorted(s["txt"] for s in samples) == sorted(ROWS[i][1].strip() for i in GOOD)
    assert all(s["png"].size == (16, 16) for s in samples)
    by_caption = {s["txt"]: s["json"]["source"] for s in samples}
    assert by_caption["a thing in a sub folder"] == "sub/c.webp"


def test_custom_columns_and_absolute_paths(data, tmp_path, read_shards):
    path = tmp_path / "elsewhere.csv"
    _write_manifest(path, [(str(data / "a.png"), "abs")], "csv", image_col="url", caption_col="text")
    out = tmp_path / "out"
    assert main([str(path), "--out", str(out), "--image-col", "url", "--caption-col", "text", "--format", "webp"]) == 0
    (sample,) = read_shards(_shards(out))
    assert sample["txt"] == "abs" and sample["webp"].size == (256, 256)


def test_malformed_rows_become_bad_row_records(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"image": "x.png", "caption": "ok"}\n\nnot json\n{"caption": "no image"}\n')
    records = list(open_records(path))
    assert [r.index for r in records] == [0, 1, 2]
    assert [r.error for r in records] == [None, "bad_row", "bad_row"]
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("image,caption\nx.png,ok\nshort\n")
    assert [r.error for r in open_records(csv_path)] == [None, "bad_row"]


def test_workers_give_identical_shards(data, tmp_path):
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        config = PrepConfig(SampleConfig(image_size=24), shard_size=2, workers=workers, threads=workers)
        stats = run_prep(open_records(_manifest(data)), out, config)
        assert stats["written"] == 4
        outs.append(out)
    for name in ["00000.tar", "00001.tar", "00003.tar", "00001.parquet", "00002_stats.json", "sizes.json", "errors.jsonl"]:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


def test_cli_workers_flag(data, tmp_path):
    out = tmp_path / "out"
    assert main([str(_manifest(data)), "--out", str(out), "--image-size", "16", "--workers", "2"]) == 0
    assert json.loads((out / "stats.json").read_text())["written"] == 4


@pytest.mark.parametrize(
    ("mode", "size", "expected"),
    [
        ("center_crop", (100, 50), (32, 32)),
        ("keep_ratio", (100, 50), (64, 32)),
        ("keep_ratio", (50, 100), (32, 64)),
        ("border", (100, 50), (32, 32)),
        ("no", (100, 50), (100, 50)),
        ("center_crop", (10, 20), (32, 32)),  # upscales like img2dataset
    ],
)
def test_resize_modes(mode, size, expected):
    assert resize_image(Image.new("RGB", size), 32, mode).size == expected


def test_center_crop_and_border_content():
    img = Image.new("RGB", (90, 30), (255, 0, 0))
    img.paste((0, 0, 255), (30, 0, 60, 30))  # blue middle third
    crop = resize_image(img, 30, "center_crop")
    assert crop.getpixel((0, 15))[2] > 200 and crop.getpixel((29, 15))[2] > 200
    border = resize_image(Image.new("RGB", (90, 30), (0, 0, 0)), 30, "border")
    assert border.getpixel((15, 0)) == (255, 255, 255) and border.getpixel((15, 15)) == (0, 0, 0)


def test_to_rgb_composites_transparency_on_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((1, 1), (255, 0, 0, 255))
    rgb = to_rgb(rgba)
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((1, 1)) == (255, 0, 0)
    assert to_rgb(Image.new("LA", (2, 2), (0, 0))).getpixel((0, 0)) == (255, 255, 255)
    p = Image.new("P", (2, 2), 0)
    p.putpalette([0, 0, 0, 0, 255, 0])
    p.info["transparency"] = 0
    assert to_rgb(p).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("CMYK", (2, 2), (0, 255, 255, 0))).getpixel((0, 0)) == (255, 0, 0)
    assert to_rgb(Image.new("I;16", (2, 2), 65535)).getpixel((0, 0)) == (255, 255, 255)


def test_rgba_png_through_the_pipeline_is_white(data):
    encoded = process_image((data / "e.png").read_bytes(), size=8, fmt="png")
    assert Image.open(io.BytesIO(encoded.data)).getpixel((3, 3)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buf = io.BytesIO()
    Image.new("RGB", (40, 20)).save(buf, format="JPEG", exif=exif)
    assert decode_image(buf.getvalue()).size == (20, 40)
    encoded = process_image(buf.getvalue(), size=10, resize_mode="keep_ratio")
    assert (encoded.width, encoded.height, encoded.original_width, encoded.original_height) == (10, 20, 20, 40)


def test_shard_sink_counts_and_is_reproducible(tmp_path):
    for name in ("x", "y"):
        with ShardSink(tmp_path / name, maxcount=2) as sink:
            for i in range(5):
                sink.write({"__key__": f"{i:03d}", "txt": f"caption {i}", "bin": bytes([i])})
        assert sink.close() == {"00000.tar": 2, "00001.tar": 2, "00002.tar": 1}
    assert (tmp_path / "x/00001.tar").read_bytes() == (tmp_path / "y/00001.tar").read_bytes()


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "--resize-mode" in capsys.readouterr().out


def test_user_errors_exit_2(data, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert clipalign(["prep", str(tmp_path / "nope.csv"), "--out", out]) == 2
    assert "input not found" in capsys.readouterr().err
    assert clipalign(["prep", str(_manifest(data)), "--out", out, "--caption-col", "text"]) == 2
    err = capsys.readouterr().err
    assert "'text'" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "list.txt").write_text("a.png\n")
    assert clipalign(["prep", str(tmp_path / "list.txt"), "--out", out]) == 2
    assert "unknown manifest type" in capsys.readouterr().err
    with pytest.raises(ManifestError):
        open_records(_manifest(data, "jsonl"), caption_col="text")


def test_existing_shards_need_overwrite(data, tmp_path):
    out = str(tmp_path / "out")
    manifest = str(_manifest(data))
    assert clipalign(["prep", manifest, "--out", out, "--image-size", "8", "--shard-size", "1"]) == 0
    assert clipalign(["prep", manifest, "--out", out, "--image-size", "8"]) == 2
    assert clipalign(["prep", manifest, "--out", out, "--image-size", "8", "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ["00000.tar"]


def test_cli_cleaning_options(data, tmp_path, read_shards, capsys):
    (data / "dup.png").write_bytes((data / "a.png").read_bytes())
    rows = [(name, cap) for name, cap, _ in ROWS] + [("dup.png", "a &amp; copy"), ("d.png", "tiny")]
    _write_manifest(data / "more.csv", rows, "csv")
    out = tmp_path / "out"
    args = [str(data / "more.csv"), "--out", str(out), "--image-size", "8", "--extra-cols", "none", "--dedup",
            "--min-image-size", "15", "--max-caption-length", "15", "--background", "#000000", "--tokenize", "ca-tiny",
            "--threads", "1"]
    assert main(args) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["skipped_by_reason"] == {"caption_too_long": 2, "duplicate": 1, "empty_caption": 1,
                                          "image_too_small": 1, "missing_image": 1, "undecodable_image": 1}
    samples = read_shards(_shards(out))
    assert [s["txt"] for s in samples] == ["a red thing", "see-through"]
    assert samples[1]["jpg"].getpixel((4, 4)) == (0, 0, 0)  # transparent onto the --background colour
    assert "id" not in samples[0]["json"] and samples[0]["json"]["tokenizer"] == "ca-tiny"
    assert samples[0]["tok.npy"].dtype == np.int32
    capsys.readouterr()
    assert main(args) == 0  # the same command again: everything is kept
    assert "kept 1 complete shard(s)" in capsys.readouterr().out


def test_cli_refuses_bad_options(data, tmp_path, capsys):
    out = str(tmp_path / "out")
    for extra in (["--background", "red"], ["--max-aspect-ratio", "0.5"], ["--threads", "0"],
                  ["--tokenize", "no-such-model"]):
        assert clipalign(["prep", str(_manifest(data)), "--out", out, *extra]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_a_byte_that_is_not_utf8_skips_its_row_and_the_run_finishes(data, tmp_path, kind):
    path = _manifest(data, kind)
    lines = path.read_bytes().splitlines(keepends=True)
    line = 3 if kind == "csv" else 2  # row 1, after the csv's header
    lines[line - 1] = lines[line - 1].replace(b"blue", b"bl\xffue")
    path.write_bytes(b"".join(lines))
    out = tmp_path / "out"
    assert main([str(path), "--out", str(out), "--image-size", "16"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["written"] == len(GOOD) - 1 and stats["skipped_by_reason"]["bad_row"] == 1
    errors = {e["index"]: e for e in map(json.loads, (out / "errors.jsonl").read_text().splitlines())}
    assert errors[1]["reason"] == "bad_row" and errors[1]["detail"] == f"line {line}: byte 0xff is not UTF-8"


def test_a_truncated_gzip_manifest_keeps_its_rows_and_counts_the_break(data, tmp_path):
    import gzip

    rows = [("a.png", f"caption {i}") for i in range(2000)]
    _write_manifest(data / "big.csv", rows, "csv")
    packed = gzip.compress((data / "big.csv").read_bytes())
    (data / "big.csv.gz").write_bytes(packed[: len(packed) // 2])
    records = list(open_records(data / "big.csv.gz"))
    assert records[-1].error == "bad_row" and "unreadable after row" in records[-1].detail
    assert len(records) > 100 and all(r.error is None for r in records[:-1])


def test_directories_fifos_and_devices_are_not_image_files(data, tmp_path):
    (data / "dir.png").mkdir()
    os.mkfifo(data / "fifo.png")  # reading it would block forever
    rows = [("a.png", "fine"), ("dir.png", "a folder"), ("fifo.png", "a pipe"), ("/dev/null", "a device")]
    _write_manifest(data / "special.csv", rows, "csv")
    out = tmp_path / "out"
    assert main([str(data / "special.csv"), "--out", str(out), "--image-size", "16"]) == 0
    errors = {e["index"]: e for e in map(json.loads, (out / "errors.jsonl").read_text().splitlines())}
    assert {i: e["reason"] for i, e in errors.items()} == {1: "not_a_file", 2: "not_a_file", 3: "not_a_file"}
    assert "directory" in errors[1]["detail"] and "FIFO" in errors[2]["detail"] and "device" in errors[3]["detail"]


def test_a_folder_counts_what_is_named_like_an_image_but_is_not_a_file(tmp_path):
    folder = tmp_path / "photos"
    _make_image(folder / "a.png", ROWS[0][2], 0)
    (folder / "a.txt").write_text("fine")
    (folder / "b.png").mkdir()
    os.mkfifo(folder / "c.png")  # reading it would block forever
    for stem in "bc":
        (folder / f"{stem}.txt").write_text("a caption")  # so the image is what is wrong
    out = tmp_path / "out"
    assert main([str(folder), "--out", str(out), "--image-size", "16"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["written"] == 1 and stats["skipped_by_reason"] == {"not_a_file": 2}
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [(e["source"], e["reason"]) for e in errors] == [("b.png", "not_a_file"), ("c.png", "not_a_file")]
