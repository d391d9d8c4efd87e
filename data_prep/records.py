"""One input row of a manifest, COCO file or folder, as every reader yields it."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

from clipalign.formats.skips import BAD_ROW


class ManifestError(ValueError):
    """The manifest as a whole cannot be read (unknown type, missing column, ...)."""


@dataclass(frozen=True)
class Record:
    """One input row.

    Attributes:
        index: 0-based position among the input's data rows (blank lines not counted).
        source: The image path or URL as written in the input.
        path: A local ``source`` resolved against the manifest's folder (``None`` for URLs or no path).
        caption: The caption with surrounding whitespace stripped (``None`` if absent).
        error: A short reason if the row itself is malformed (e.g. ``"bad_row"``).
        detail: Human-readable detail for ``error``.
        url: The ``http(s)://`` URL to download, if ``source`` is one.
        captions: Several captions of one image (COCO ``--caption-mode all``); ``caption`` is the first.
        extra: Other columns of the row, carried into the sample's ``json``.
    """

    index: int
    source: str
    path: Path | None
    caption: str | None
    error: str | None = None
    detail: str | None = None
    url: str | None = None
    captions: tuple[str, ...] | None = None
    extra: dict[str, Any] | None = None

    @property
    def key(self) -> str:
        """The sample key: the row index, zero-padded to 9 digits."""
        return f"{self.index:09d}"


def make_record(
    index: int, base: Path, source: str, caption: str | None, extra: dict[str, Any] | None = None
) -> Record:
    """A record for ``source``: an ``http(s)`` URL, a ``file://`` URL or a path relative to ``base``."""
    scheme = source.split(":", 1)[0].lower() if "://" in source else ""
    if scheme in ("http", "https"):
        return Record(index, source, None, caption, url=source, extra=extra or None)
    if scheme == "file":
        parts = urlsplit(source)
        path = Path(url2pathname(unquote(parts.path)))
        return Record(index, source, path, caption, extra=extra or None)
    if scheme:
        return Record(index, source, None, caption, BAD_ROW, f"unsupported URL scheme {scheme!r}", extra=extra or None)
    # One Path built from a joined string: pathlib parsing is most of a long manifest's read time.
    path = Path(os.path.join(base, source)) if source else None
    return Record(index, source, path, caption, extra=extra or None)
