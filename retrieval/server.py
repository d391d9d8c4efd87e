"""HTTP API and web page over a ``QueryEngine``, on the standard library's threading server.

Routes: ``GET /`` (the page), ``GET /health``, ``GET /search?text=...&k=...&over=images|captions``,
``POST /search?k=...`` with an image as the body, ``GET /thumb/<row>``. Thumbnails are found
by row number in the index's own metadata; no path from a request is ever opened.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from retrieval.engine import OVER, QueryEngine
from retrieval.page import search_page
from retrieval.thumbs import thumbnail

MAX_K = 100
MAX_TEXT = 1000  # characters of a text query
MAX_BODY = 8 << 20  # bytes of an uploaded query image
PUBLIC_FIELDS = ("rank", "score", "id", "key", "caption", "source")
_THUMB = re.compile(r"/thumb/([0-9]{1,12})")


class BadRequest(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


def _public(hits: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Shard paths and byte offsets stay on the server.
    return [{f: h.get(f) for f in PUBLIC_FIELDS} for h in hits]


def _params(query: str) -> tuple[int, str]:
    q = parse_qs(query)
    try:
        k = int(q.get("k", ["10"])[0])
    except ValueError:
        raise BadRequest(HTTPStatus.BAD_REQUEST, "k must be an integer") from None
    if not 1 <= k <= MAX_K:
        raise BadRequest(HTTPStatus.BAD_REQUEST, f"k must be between 1 and {MAX_K}")
    over = q.get("over", ["images"])[0]
    if over not in OVER:
        raise BadRequest(HTTPStatus.BAD_REQUEST, "over must be 'images' or 'captions'")
    return k, over


def _run(search: Any, query: Any, k: int, over: str) -> list[dict[str, Any]]:
    """The hits of one query; a query the index cannot answer is a 400, not a dropped connection."""
    try:
        return search(query, k, over)[0]
    except (KeyError, ValueError) as err:
        raise BadRequest(HTTPStatus.BAD_REQUEST, str(err).strip("'\"")) from None


def make_handler(engine: QueryEngine, quiet: bool = False) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to ``engine``."""
    index = engine.index
    page = search_page(index.table.num_rows, "caption" in index.indexes, MAX_K).encode()

    @lru_cache(maxsize=4096)
    def thumb(row_id: int) -> bytes | None:
        try:
            return thumbnail(index.rows([row_id])[0])
        except (OSError, ValueError, KeyError):
            return None

    class Handler(BaseHTTPRequestHandler):
        server_version = "clipalign"
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
            if not quiet:
                super().log_message(format, *args)

        def _send(self, status: HTTPStatus, body: bytes, ctype: str, cache: bool = False) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "max-age=3600" if cache else "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: HTTPStatus, obj: Any) -> None:
            self._send(status, json.dumps(obj).encode(), "application/json")

        def _error(self, status: HTTPStatus, message: str) -> None:
            self._json(status, {"error": message})

        def _search_text(self, query: str) -> dict[str, Any]:
            k, over = _params(query)
            text = parse_qs(query).get("text", [""])[0].strip()
            if not text:
                raise BadRequest(HTTPStatus.BAD_REQUEST, "give a text query: /search?text=...")
            if len(text) > MAX_TEXT:
                raise BadRequest(HTTPStatus.BAD_REQUEST, f"text queries are limited to {MAX_TEXT} characters")
            return {"query": {"text": text, "over": over, "k": k}, "results": _public(_run(engine.search_texts, [text], k, over))}

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            url = urlsplit(self.path)
            try:
                if url.path == "/":
                    self._send(HTTPStatus.OK, page, "text/html; charset=utf-8")
                elif url.path == "/health":
                    self._json(HTTPStatus.OK, {"status": "ok", "count": index.table.num_rows, "dim": index.dim,
                                               "model": index.info.get("model"), "targets": list(index.indexes)})
                elif url.path == "/search":
                    self._json(HTTPStatus.OK, self._search_text(url.query))
                elif (m := _THUMB.fullmatch(url.path)) and int(m.group(1)) < index.table.num_rows:
                    data = thumb(int(m.group(1)))
                    if data is None:
                        self._error(HTTPStatus.NOT_FOUND, "image unavailable")
                    else:
                        self._send(HTTPStatus.OK, data, "image/jpeg", cache=True)
                else:
                    self._error(HTTPStatus.NOT_FOUND, "not found")
            except BadRequest as err:
                self._error(err.status, str(err))

        do_HEAD = do_GET

        def do_POST(self) -> None:  # noqa: N802
            url = urlsplit(self.path)
            try:
                if url.path != "/search":
                    raise BadRequest(HTTPStatus.NOT_FOUND, "not found")
                k, over = _params(url.query)
                length = self.headers.get("Content-Length")
                if length is None or not length.isdigit():
                    raise BadRequest(HTTPStatus.LENGTH_REQUIRED, "send the image with a Content-Length")
                if int(length) > MAX_BODY:
                    self.close_connection = True  # the unread body must not be parsed as a request
                    raise BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"images are limited to {MAX_BODY >> 20} MiB")
                hits = _run(engine.search_image_bytes, self.rfile.read(int(length)), k, over)
                self._json(HTTPStatus.OK, {"query": {"image": True, "over": over, "k": k}, "results": _public(hits)})
            except BadRequest as err:
                self.close_connection = True  # the body may be unread: never parse it as a request
                self._error(err.status, str(err))

    return Handler


def make_server(engine: QueryEngine, host: str = "127.0.0.1", port: int = 8000, quiet: bool = False) -> ThreadingHTTPServer:
    """A bound, not yet serving, server (``port=0`` picks a free port: see ``server.server_address``)."""
    server = ThreadingHTTPServer((host, port), make_handler(engine, quiet))
    server.daemon_threads = True
    return server
