"""The one image decoder facing untrusted files: pixel bombs refused from the header, and
anything that is not a regular file (FIFO, directory, device) refused before it is read."""
import os
import time

import pytest
from PIL import Image

from clipalign.formats.images import DEFAULT_MAX_PIXELS, decode_image, image_files, is_regular_file, read_image
from clipalign.formats.skips import IMAGE_TOO_LARGE, MISSING_IMAGE, NOT_A_FILE, BadSample
from tests.hostile_inputs import big_png, fifo

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's, before our refusal

@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    data = big_png(9500, 9500)  # 90.25 Mpx, just over the limit
    assert 9500 * 9500 > DEFAULT_MAX_PIXELS and len(data) < 1 << 20
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    path.write_bytes(data)
    return path


def test_a_pixel_bomb_is_refused_from_its_header_before_decoding(bomb, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("decoded")

    monkeypatch.setattr(Image.Image, "load", never)
    monkeypatch.setattr(Image.Image, "convert", never)
    for decode in (lambda: decode_image(bomb.read_bytes(), "upload", max_pixels=DEFAULT_MAX_PIXELS),
                   lambda: read_image(bomb)):  # read_image bounds by default
        with pytest.raises(BadSample) as err:
            decode()
        assert err.value.reason == IMAGE_TOO_LARGE and "9500x9500" in str(err.value)


def test_the_bound_is_the_pixel_count(tmp_path):
    data = big_png(40, 25)
    assert decode_image(data, max_pixels=1000).size == (40, 25) and decode_image(data).size == (40, 25)
    with pytest.raises(BadSample, match=IMAGE_TOO_LARGE):
        decode_image(data, max_pixels=999)


def test_a_fifo_is_refused_at_once_not_read(tmp_path):
    with fifo(tmp_path / "q.png") as path:
        t0 = time.perf_counter()
        with pytest.raises(BadSample) as err:
            read_image(path)
        assert err.value.reason == NOT_A_FILE and time.perf_counter() - t0 < 5
        assert not is_regular_file(path)


@pytest.mark.parametrize("make", ["directory", "device", "missing"])
def test_directories_devices_and_missing_files(tmp_path, make):
    path = {"directory": tmp_path, "device": "/dev/null", "missing": tmp_path / "gone.png"}[make]
    with pytest.raises(BadSample) as err:
        read_image(path)
    assert err.value.reason == (MISSING_IMAGE if make == "missing" else NOT_A_FILE)


def test_a_folder_walk_lists_regular_files_only(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "b.png").mkdir()
    os.symlink(tmp_path / "a.png", tmp_path / "c.png")
    with fifo(tmp_path / "d.png"):
        assert [p.name for p in image_files(tmp_path)] == ["a.png", "c.png"]
