"""A self-contained HTML results page: one section per query, a grid of thumbnails with captions and scores."""
from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import Any, Callable

from clipalign.formats.atomic import write_text

STYLE = """body{font-family:system-ui,sans-serif;margin:1.5rem;background:#fafafa;color:#222}
h2{font-size:1.1rem;margin:1.5rem 0 .5rem}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(180px,1fr));gap:12px}
.hit{background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px;font-size:.85rem}
.hit img{width:100%;aspect-ratio:1;object-fit:contain;background:#eee;border-radius:4px}
.score{color:#06c;font-variant-numeric:tabular-nums}.missing{color:#a00}"""


def hit_card(hit: dict[str, Any], src: str | None) -> str:
    """One result: thumbnail (``src`` URL, or a note when unavailable), caption, cosine score, key."""
    img = f'<img src="{html.escape(src)}" alt="{html.escape(hit.get("caption", ""))}">' if src else \
        '<div class="missing">image unavailable</div>'
    return (f'<div class="hit">{img}<div class="caption">{html.escape(hit.get("caption", ""))}</div>'
            f'<div><span class="score">{hit["score"]:.3f}</span> · #{hit["rank"]} · {html.escape(str(hit.get("key", "")))}'
            f"</div></div>")


def results_page(results: list[tuple[str, list[dict[str, Any]]]], thumb: Callable[[dict[str, Any]], bytes | None]) -> str:
    """The page for ``(query label, hits)`` pairs, thumbnails embedded as data URIs from ``thumb(hit)``."""
    sections = []
    for label, hits in results:
        cards = []
        for hit in hits:
            data = thumb(hit)
            cards.append(hit_card(hit, f"data:image/jpeg;base64,{base64.b64encode(data).decode()}" if data else None))
        sections.append(f"<h2>{html.escape(label)}</h2><div class=\"grid\">{''.join(cards)}</div>")
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>clipalign search</title>"
            f"<style>{STYLE}</style></head><body><h1>clipalign search</h1>{''.join(sections)}</body></html>\n")


def _thumbnail_or_none(hit: dict[str, Any]) -> bytes | None:
    from retrieval.thumbs import thumbnail  # PIL: only for a page, never for a plain text search

    try:
        return thumbnail(hit)
    except (OSError, ValueError, KeyError):  # the image is gone or unreadable: the card says so
        return None


def write_results_page(path: str | os.PathLike, results: list[tuple[str, list[dict[str, Any]]]],
                       thumb: Callable[[dict[str, Any]], bytes | None] = _thumbnail_or_none) -> Path:
    """Write ``results_page`` to ``path`` atomically (a full disk leaves no torn page), the
    thumbnails read back from the index's own data by ``thumb(hit)``.

    Raises:
        OSError: the page could not be written, naming ``path``.
    """
    return write_text(path, results_page(results, thumb))
