"""The torch resampler against PIL's own bicubic resize, the plain reference it stands in for."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.resample import resample, single_thread


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    smooth = np.stack([np.sin(xx * rng.uniform(4, 15) + c) * np.cos(yy * rng.uniform(4, 15)) for c in range(3)], -1)
    pixels = smooth * 90 + 128 + rng.normal(0, 20, (height, width, 3))  # edges, gradients and noise
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB")


@pytest.mark.parametrize(
    "src, size, box",
    [
        ((640, 480), (256, 256), (80, 0, 560, 480)),  # center crop, 1.9x shrink
        ((480, 640), (224, 224), (0, 80, 480, 560)),
        ((1000, 700), (256, 179), None),  # keep_ratio, 3.9x shrink
        ((3000, 200), (384, 26), None),  # 7.8x shrink, wide: block-averaged by 2 first
        ((4000, 3000), (256, 192), None),  # 15.6x: by 5 first
        ((2001, 1333), (256, 171), None),  # odd sides left over by the block average
        ((99, 57), (256, 147), None),  # upscale
        ((301, 301), (300, 300), None),  # nearly the same size
        ((64, 48), (33, 17), (3, 5, 61, 44)),  # odd sizes and an off-centre box
    ],
)
def test_matches_pil_bicubic(src, size, box):
    img = _photo(*src)
    ours = np.asarray(resample(img, size, box), np.int16)
    # Crop, then resize: PIL's resize(box=...) would also read pixels beyond the box's edges.
    region = img.crop(box) if box is not None else img
    reference = np.asarray(region.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0), np.int16)
    assert ours.shape == reference.shape == (size[1], size[0], 3)
    diff = np.abs(ours - reference)
    # Same filter, different integer rounding: off by a few levels at most, almost never at all.
    # (After a block average the two also split odd leftover columns differently.)
    block_averaged = min(region.width // size[0], region.height // size[1]) >= 6
    assert diff.max() <= 3 and diff.mean() < (0.5 if block_averaged else 0.1)


def test_box_selects_the_region():
    img = Image.new("RGB", (300, 100), (255, 0, 0))
    img.paste((0, 0, 255), (100, 0, 200, 100))  # blue middle square
    out = resample(img, (10, 10), (100, 0, 200, 100))
    assert out.mode == "RGB" and out.size == (10, 10)
    assert (np.asarray(out) == (0, 0, 255)).all()


def test_refuses_other_modes():
    with pytest.raises(ValueError, match="RGB"):
        resample(Image.new("RGBA", (8, 8)), (4, 4))


def test_single_thread_restores_the_thread_count():
    before = torch.get_num_threads()
    torch.set_num_threads(3)  # not 1, which the test workers run with (tests/conftest.py)
    try:
        with single_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_torch_is_imported_on_first_use():
    # `import torch` takes seconds: prep's main process and its argument errors must not wait for it.
    code = "import sys, clipalign.cli.prep, data_prep.prep; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
