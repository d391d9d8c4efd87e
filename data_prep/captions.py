"""Caption cleaning: normalise text and say why a caption cannot be used."""
from __future__ import annotations

import html
import re

from clipalign.formats.skips import CAPTION_TOO_LONG, EMPTY_CAPTION, MISSING_CAPTION

_SPACE = re.compile(r"\s+")


def normalize_caption(text: str) -> str:
    """Decode HTML entities (``&amp;``, ``&#39;``, ``&nbsp;``) and collapse whitespace runs to one space."""
    # Twice, because scraped alt texts are often escaped twice ("&amp;amp;").
    return _SPACE.sub(" ", html.unescape(html.unescape(text))).strip()


def caption_problem(caption: str | None, max_length: int | None = None) -> tuple[str, str] | None:
    """``(reason, detail)`` if the already normalised ``caption`` is unusable, else ``None``."""
    if caption is None:
        return MISSING_CAPTION, "no caption"
    if not caption:
        return EMPTY_CAPTION, "caption is empty"
    if max_length is not None and len(caption) > max_length:
        return CAPTION_TOO_LONG, f"{len(caption)} characters > {max_length}"
    return None
