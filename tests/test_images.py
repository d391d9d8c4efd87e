"""Dirty images and captions: each case is converted right or skipped with its reason."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from data_prep.captions import normalize_caption
from data_prep.images import RejectedImage, process_image
from data_prep.manifest import Record
from data_prep.prep import PrepConfig, run_prep
from data_prep.sample import SampleConfig, process_record


def _bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _pixel(data: bytes, size: int = 8, **kw) -> tuple[int, int, int]:
    out = process_image(data, size=size, fmt="png", **kw)
    return Image.open(io.BytesIO(out.data)).getpixel((size // 2, size // 2))


def test_modes_convert_to_the_right_colours():
    assert _pixel(_bytes(Image.new("CMYK", (10, 10), (0, 255, 255, 0)), "JPEG")) == pytest.approx((255, 0, 0), abs=3)
    p = Image.new("P", (10, 10), 1)
    p.putpalette([0, 0, 0, 0, 0, 255])
    assert _pixel(_bytes(p)) == (0, 0, 255)
    p.info["transparency"] = 1
    assert _pixel(_bytes(p, transparency=1)) == (255, 255, 255)  # transparent palette entry -> white
    assert _pixel(_bytes(Image.new("LA", (10, 10), (0, 0)))) == (255, 255, 255)
    assert _pixel(_bytes(Image.new("RGBA", (10, 10), (0, 0, 0, 0))), background=(0, 128, 0)) == (0, 128, 0)
    half = Image.new("RGBA", (10, 10), (0, 0, 0, 128))
    assert _pixel(_bytes(half)) == pytest.approx((127, 127, 127), abs=1)  # composited, not dropped
    sixteen = Image.fromarray(np.full((10, 10), 65535 // 2, np.uint16))
    assert _pixel(_bytes(sixteen)) == pytest.approx((128, 128, 128), abs=1)  # scaled, not clipped to white


def test_animated_gif_uses_the_first_frame():
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert _pixel(buf.getvalue()) == pytest.approx((255, 0, 0), abs=8)


@pytest.mark.parametrize("orientation, size", [(1, (40, 20)), (6, (20, 40)), (8, (20, 40)), (3, (40, 20))])
def test_exif_orientation_with_fast_and_full_decode(orientation, size):
    exif = Image.Exif()
    exif[0x0112] = orientation
    img = Image.new("RGB", (400, 200), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 200, 200))  # left half blue
    data = _bytes(img, "JPEG", exif=exif, quality=95)
    fast = process_image(data, size=10, resize_mode="keep_ratio")
    full = process_image(data, size=10, resize_mode="keep_ratio", fast_decode=False)
    for out in (fast, full):
        assert (out.original_width, out.original_height) == (size[0] * 10, size[1] * 10)
        assert (out.width, out.height) == ((20, 10) if size[0] > size[1] else (10, 20))
    a = np.asarray(Image.open(io.BytesIO(fast.data)), np.float64)
    b = np.asarray(Image.open(io.BytesIO(full.data)), np.float64)
    assert np.abs(a - b).mean() < 8  # the reduced-scale decode looks the same


def _photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour fields, sharp-edged shapes and sensor-like noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    fields = [np.sin(xx * rng.uniform(3, 12) + rng.uniform(0, 6)) * np.cos(yy * rng.uniform(3, 12)) for _ in range(3)]
    img = Image.fromarray((np.stack(fields, -1) * 90 + 128 + rng.normal(0, 8, (height, width, 3))).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x, y = np.sort(rng.uniform(0, width, 2)), np.sort(rng.uniform(0, height, 2))
        draw.ellipse((x[0], y[0], x[1], y[1]), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return img


@pytest.mark.parametrize("size, fmt", [((640, 480), "JPEG"), ((480, 640), "JPEG"), ((2000, 1600), "JPEG"),
                                       ((2000, 1600), "PNG")])
def test_fast_resize_looks_like_a_plain_lanczos_resize(size, fmt):
    # The fast path (reduced-scale JPEG decode, torch's antialiased bicubic) against a full
    # decode and one Lanczos resize of the centred square.
    data = _bytes(_photo_like(*size), fmt, quality=95)
    w, h = size
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    plain = Image.open(io.BytesIO(data)).convert("RGB").resize((256, 256), Image.Resampling.LANCZOS, box=box)
    out = process_image(data, size=256, fmt="png")
    diff = np.abs(np.asarray(Image.open(io.BytesIO(out.data)), np.float64) - np.asarray(plain, np.float64))
    assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 8  # JPEG q95 alone changes ~2 on average


def test_filters_and_bomb_guard():
    big = _bytes(Image.new("RGB", (300, 200)))
    with pytest.raises(RejectedImage) as err:
        process_image(big, size=8, max_pixels=50_000)
    assert err.value.reason == "image_too_large"
    with pytest.raises(RejectedImage) as err:
        process_image(big, size=8, min_size=201)
    assert err.value.reason == "image_too_small"
    process_image(big, size=8, min_size=200, max_aspect_ratio=1.5)
    with pytest.raises(RejectedImage) as err:
        process_image(big, size=8, max_aspect_ratio=1.4)
    assert err.value.reason == "bad_aspect_ratio"


def test_normalize_caption():
    assert normalize_caption("  Tom &amp; Jerry&#39;s\n\t house&nbsp;! ") == "Tom & Jerry's house !"
    assert normalize_caption("fish &amp;amp; chips") == "fish & chips"
    assert normalize_caption(" \n ") == ""


def _record(tmp_path, i, caption, img):
    path = tmp_path / f"{i}.png"
    if img is not None:
        path.write_bytes(img)
    return Record(i, path.name, path, caption)


def test_every_skip_reason_through_run_prep(tmp_path, read_shards):
    ok = _bytes(Image.new("RGB", (40, 30), (9, 9, 9)))
    cases = [
        ("fine &amp; dandy", ok, None),
        ("dup", ok, "duplicate"),
        ("small", _bytes(Image.new("RGB", (10, 30))), "image_too_small"),
        ("wide", _bytes(Image.new("RGB", (200, 20))), "bad_aspect_ratio"),
        ("bomb", _bytes(Image.new("L", (1000, 1000))), "image_too_large"),
        ("broken", ok[:40], "undecodable_image"),
        ("gone", None, "missing_image"),
        (" &nbsp; ", ok, "empty_caption"),
        (None, ok, "missing_caption"),
        ("x" * 41, _bytes(Image.new("RGB", (40, 30), (1, 2, 3))), "caption_too_long"),
        ("another", _bytes(Image.new("RGB", (30, 40), (1, 2, 3))), None),
    ]
    records = [_record(tmp_path, i, cap, img) for i, (cap, img, _) in enumerate(cases)]
    sample = SampleConfig(image_size=8, min_image_size=20, max_aspect_ratio=3, max_pixels=500_000, max_caption_length=40)
    stats = run_prep(records, tmp_path / "out", PrepConfig(sample, shard_size=4, dedup=True))
    errors = [json.loads(line) for line in (tmp_path / "out/errors.jsonl").read_text().splitlines()]
    assert {e["index"]: e["reason"] for e in errors} == {i: r for i, (_, _, r) in enumerate(cases) if r}
    assert stats["written"] == 2 and stats["skipped_by_reason"]["duplicate"] == 1
    samples = read_shards([tmp_path / "out" / f"0000{i}.tar" for i in range(3)])
    assert [s["txt"] for s in samples] == ["fine & dandy", "another"]
    assert samples[0]["json"]["caption"] == "fine & dandy" and len(samples[0]["json"]["sha256"]) == 64


def test_dedup_works_across_shards_and_is_off_by_default(tmp_path):
    ok = _bytes(Image.new("RGB", (20, 20), (5, 5, 5)))
    records = [_record(tmp_path, i, f"c{i}", ok) for i in range(5)]
    assert run_prep(records, tmp_path / "plain", PrepConfig(SampleConfig(image_size=8), shard_size=2))["written"] == 5
    stats = run_prep(records, tmp_path / "dedup", PrepConfig(SampleConfig(image_size=8), shard_size=2, dedup=True))
    assert stats["written"] == 1
    assert json.loads((tmp_path / "dedup/sizes.json").read_text()) == {"00000.tar": 1, "00001.tar": 0, "00002.tar": 0}


def test_tokenize_stores_token_ids(tmp_path, read_shards):
    import open_clip

    import clipalign.factory  # noqa: F401

    record = _record(tmp_path, 0, "a red square", _bytes(Image.new("RGB", (20, 20))))
    outcome = process_record(record, SampleConfig(image_size=8, tokenize="ca-tiny"))
    ids = np.load(io.BytesIO(outcome.sample["tok.npy"]))
    expected = open_clip.get_tokenizer("ca-tiny")(["a red square"])[0].numpy()
    assert ids.dtype == np.int32 and ids.shape == expected.shape and (ids == expected).all()
    meta = json.loads(outcome.sample["json"])
    assert meta["tokenizer"] == "ca-tiny" and meta["context_length"] == expected.shape[0]
    from clipalign.data import decode_tokens  # the trainer's reader takes them as they are

    assert (decode_tokens(outcome.sample, expected.shape[0]).numpy() == expected).all()
