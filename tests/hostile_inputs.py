"""Inputs that misbehave: a decompression bomb small on disk, and a FIFO that cannot hang a test."""
from __future__ import annotations

import contextlib
import os
import struct
import threading
import zlib
from pathlib import Path
from typing import Iterator


def big_png(width: int, height: int, rgb: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    """A solid-colour RGB PNG of ``width`` x ``height`` pixels, compressed row by row (9500 x 9500,
    90 Mpx, is ~280 KB; decoded it is 270 MB), never held decoded here."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    row = b"\x00" + bytes(rgb) * width  # filter byte 0, then the pixels
    z = zlib.compressobj(9)
    idat = b"".join([z.compress(row) for _ in range(height)] + [z.flush()])
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@contextlib.contextmanager
def fifo(path: Path, unblock_after_s: float = 10.0) -> Iterator[Path]:
    """A FIFO at ``path``. Should anything open it for reading, a writer opens and closes it after
    ``unblock_after_s`` so the reader sees EOF: a regression fails the test instead of hanging it."""
    os.mkfifo(path)
    stop = threading.Event()

    def unblock() -> None:
        wait = unblock_after_s
        while not stop.wait(wait):
            with contextlib.suppress(OSError):
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # ENXIO unless a reader waits
            wait = 0.5

    watchdog = threading.Thread(target=unblock, daemon=True)
    watchdog.start()
    try:
        yield path
    finally:
        stop.set()
        watchdog.join(timeout=5)
