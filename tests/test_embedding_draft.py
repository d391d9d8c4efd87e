"""Draft JPEG decoding for embedding (``clipalign.embedding.jpeg_draft``) against a whole decode."""
import io

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from clipalign.checkpoint import load_model
from clipalign.embedding import jpeg_draft
from clipalign.formats.images import decode_image, read_image
from clipalign.pixels import uint8_transform
from retrieval.embed import embed_unit
from retrieval.sources import folder_units
from tests.retrieval_toy import make_checkpoint


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour waves under noise: edges and texture, like a photo's."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    waves = np.stack([np.sin(xx * rng.uniform(4, 15) + c) * np.cos(yy * rng.uniform(4, 15)) for c in range(3)], -1)
    pixels = waves * 90 + 128 + rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB")


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_the_least_size_keeps_twice_what_the_resize_makes():
    shortest = jpeg_draft(open_clip.image_transform(64, is_train=False))
    assert shortest((640, 480)) == (171, 128) and shortest((480, 640)) == (128, 171)
    assert shortest((128, 300)) is None and shortest((100, 100)) is None  # nothing to gain: decoded whole
    squash = jpeg_draft(open_clip.image_transform(64, is_train=False, resize_mode="squash"))
    assert squash((640, 480)) == (128, 128) and squash((640, 100)) == (128, 100) and squash((128, 90)) is None


@pytest.mark.parametrize("transform", [
    open_clip.image_transform(64, is_train=False, resize_mode="longest"),  # open_clip's own ResizeKeepRatio
    open_clip.image_transform(64, is_train=True),  # a random crop first: it may need every pixel
    T.Compose([T.Resize(64, max_size=80), T.ToTensor()]),
    T.Compose([T.Lambda(lambda im: im), T.Resize(64)]),
    T.Resize(64),  # not a Compose
])
def test_transforms_that_do_not_start_with_a_plain_resize_decode_whole(transform):
    assert jpeg_draft(transform) is None


@pytest.mark.parametrize("size, mode", [((640, 480), "RGB"), ((480, 700), "RGB"), ((800, 600), "L"),
                                        ((640, 480), "CMYK")])
def test_a_draft_decode_gives_the_transform_nearly_the_whole_decodes_pixels(size, mode):
    transform = open_clip.image_transform(64, is_train=False)
    pixels, _ = uint8_transform(transform)
    data = _jpeg(_photo(*size).convert(mode))
    whole, drafted = decode_image(data), decode_image(data, draft=jpeg_draft(transform))
    assert whole.size == size and drafted.mode == "RGB"
    assert 128 <= min(drafted.size) < min(size)  # the decoder scaled down, keeping 2 x 64
    a, b = pixels(whole).numpy().astype(np.int16), pixels(drafted).numpy().astype(np.int16)
    assert a.shape == b.shape == (3, 64, 64)
    diff = np.abs(a - b)
    assert diff.mean() < 0.5 and diff.max() <= 12, (diff.mean(), diff.max())


def test_only_jpegs_are_drafted(tmp_path):
    least = jpeg_draft(open_clip.image_transform(64, is_train=False))
    _photo(640, 480).save(tmp_path / "a.png")
    _photo(640, 480).save(tmp_path / "a.webp")
    assert read_image(tmp_path / "a.png", draft=least).size == (640, 480)
    assert read_image(tmp_path / "a.webp", draft=least).size == (640, 480)


def test_embedding_drafts_by_default_and_decodes_whole_when_asked(tmp_path):
    model, transform, tokenizer, _ = load_model(make_checkpoint(tmp_path / "checkpoint.pt"))
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):
        (folder / f"{i}.jpg").write_bytes(_jpeg(_photo(400 + 40 * i, 300, seed=i)))
    _photo(300, 300).save(folder / "small.png")
    unit = folder_units(folder)[0]
    kw = dict(captions=False, batch_size=4, precision="fp32")
    drafted, _, rows, _ = embed_unit(model, transform, tokenizer, unit, **kw)
    exact, _, rows_exact, _ = embed_unit(model, transform, tokenizer, unit, exact_decode=True, **kw)
    assert rows == rows_exact and len(rows) == 7
    # The whole decode is the model's own preprocessing, image by image.
    with torch.no_grad():
        reference = model.encode_image(torch.stack([transform(read_image(r["source"])) for r in rows]), normalize=True)
    assert np.allclose(exact, reference.numpy(), atol=1e-5)
    gap = dict(zip((r["key"] for r in rows), np.abs(drafted - exact).max(axis=1)))
    assert gap.pop("small") == 0  # a PNG is never drafted
    assert all(0 < g < 5e-3 for g in gap.values()), gap


def test_the_embed_command_decodes_whole_with_exact_decode(tmp_path):
    from clipalign.cli import main
    from retrieval.embed import load_embeddings

    checkpoint = make_checkpoint(tmp_path / "checkpoint.pt")
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(_jpeg(_photo(480, 360, seed=i)))
    vectors = {}
    for name, extra in (("draft", []), ("exact", ["--exact-decode"])):
        assert main(["embed", "--checkpoint", str(checkpoint), "--data", str(folder), "--out", str(tmp_path / name),
                     "--no-progress", "--no-captions", "--dtype", "float32", *extra]) == 0
        vectors[name] = load_embeddings(tmp_path / name)[0]["image"]
    model, transform, _, _ = load_model(checkpoint)
    with torch.no_grad():
        reference = model.encode_image(torch.stack([transform(read_image(folder / f"{i}.jpg")) for i in range(3)]),
                                       normalize=True).numpy()
    assert np.allclose(vectors["exact"], reference, atol=1e-5)
    assert 0 < np.abs(vectors["draft"] - reference).max() < 5e-3
