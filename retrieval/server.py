"""HTTP API and web page over a ``QueryEngine``, on the standard library's threading server.

Routes: ``GET /`` (the page), ``GET /health``, ``GET /search?text=...&k=...&over=images|captions``,
``POST /search?k=...`` with an image as the body, ``GET /thumb/<row>``. Thumbnails are found
by row number in the index's own metadata; no path from a request is ever opened.

One thread per connection (kept alive between requests, closed after ``IDLE_TIMEOUT_S``
of silence); the kernel queues up to ``BACKLOG`` connections not yet accepted. At most
``retrieval.engine.MAX_DECODES`` images decode at once; an upload that finds them all taken
for ``DECODE_WAIT_S`` gets 503.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from retrieval.engine import MAX_K, MAX_TEXT, OVER, Busy, QueryEngine
from retrieval.page import search_page
from retrieval.thumbs import thumbnail

MAX_BODY = 8 << 20  # bytes of an uploaded query image
# socketserver's default backlog is 5: with more clients connecting at once the kernel drops
# their SYNs, and each dropped one costs its client a 1 s (then 3 s) retransmission timeout.
# The kernel caps this at net.core.somaxconn (4096 on current kernels).
BACKLOG = 1024
IDLE_TIMEOUT_S = 30.0  # a connection silent this long (between requests, or mid-request) is closed
THUMB_WAIT_S = 10.0  # a thumbnail waits longer than an upload for a decode slot: a page asks for many at once
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
    except Busy as err:
        raise BadRequest(HTTPStatus.SERVICE_UNAVAILABLE, str(err)) from None
    except (KeyError, ValueError) as err:
        raise BadRequest(HTTPStatus.BAD_REQUEST, str(err).strip("'\"")) from None


def make_handler(engine: QueryEngine, quiet: bool = False,
                 idle_timeout_s: float | None = IDLE_TIMEOUT_S) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to ``engine``."""
    index = engine.index
    page = search_page(index.table.num_rows, "caption" in index.indexes, MAX_K).encode()

    @lru_cache(maxsize=4096)
    def thumb(row_id: int) -> bytes | None:
        try:
            with engine.decode_slot(THUMB_WAIT_S):
                return thumbnail(index.rows([row_id])[0], max_pixels=engine.max_pixels)
        except (OSError, ValueError, KeyError):
            return None

    class Handler(BaseHTTPRequestHandler):
        server_version = "clipalign"
        protocol_version = "HTTP/1.1"
        timeout = idle_timeout_s  # StreamRequestHandler sets it on the socket: reads and writes time out

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
            if not quiet:
                super().log_message(format, *args)

        def _send(self, status: HTTPStatus, body: bytes, ctype: str, cache: bool = False) -> None:
            self.send_response(status)
            if status == HTTPStatus.SERVICE_UNAVAILABLE:
                self.send_header("Retry-After", "1")
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
            if len(text) > MAX_TEXT:  # the engine refuses it too: this says it in the API's words
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
                    try:
                        data = thumb(int(m.group(1)))  # Busy is raised, so never cached
                    except Busy as err:
                        raise BadRequest(HTTPStatus.SERVICE_UNAVAILABLE, str(err)) from None
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


def make_server(engine: QueryEngine, host: str = "127.0.0.1", port: int = 8000, quiet: bool = False, *,
                backlog: int = BACKLOG, idle_timeout_s: float | None = IDLE_TIMEOUT_S) -> ThreadingHTTPServer:
    """A bound, listening, not yet serving server (``port=0`` picks a free port: see
    ``server.server_address``).

    Args:
        backlog: connections the kernel queues before the server accepts them.
        idle_timeout_s: close a connection silent this long (``None``: never).
    """
    server_class = type("SearchServer", (ThreadingHTTPServer,), {"request_queue_size": backlog, "daemon_threads": True})
    return server_class((host, port), make_handler(engine, quiet, idle_timeout_s))
