"""Tiny generated data for the tests: coloured squares with captions, written as shards."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}


def square_image(colour: str, rng: np.random.Generator, size: int = 32) -> Image.Image:
    a = np.full((size, size, 3), 128, np.uint8)
    side = size // 3
    x, y = rng.integers(0, size - side, 2)
    a[y : y + side, x : x + side] = COLOURS[colour]
    return Image.fromarray(a)


def write_toy_shards(
    folder: Path, n: int = 256, per_shard: int = 64, seed: int = 0, empty_caption_keys: tuple[int, ...] = ()
) -> list[str]:
    """``n`` JPEG samples of one coloured square each; returns the shard paths."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with wds.ShardWriter(str(folder / "%05d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(n):
            colour = list(COLOURS)[i % len(COLOURS)]
            buf = io.BytesIO()
            square_image(colour, rng).save(buf, "JPEG", quality=95)
            caption = "" if i in empty_caption_keys else f"a {colour} square"
            sink.write({"__key__": f"{i:09d}", "jpg": buf.getvalue(), "txt": caption,
                        "json": {"key": f"{i:09d}", "source": f"img/{i}.jpg"}})
    return sorted(str(p) for p in folder.glob("*.tar"))


def truncate_mid_member(path: str, member: int) -> None:
    """Cut the shard in the middle of the data of its ``member``-th file, as a killed download does."""
    with tarfile.open(path) as tar:
        info = tar.getmembers()[member]
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: info.offset_data + info.size // 2])
