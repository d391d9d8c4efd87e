"""HTTP API and web page over a ``QueryEngine``, on the standard library's threading server.

Routes: ``GET /`` (the page), ``GET /health``, ``GET /search?text=...&k=...&over=images|captions``,
``POST /search?k=...`` with an image as the body, ``GET /thumb/<row>``. Thumbnails are found
by row number in the index's own metadata; no path from a request is ever opened.

Connections, as mature servers bound them (Apache's mod_reqtimeout and MaxRequestWorkers,
nginx's client_header/body timeouts, uvicorn's --limit-concurrency):

* One thread per connection, kept alive between requests and closed after
  ``IDLE_TIMEOUT_S`` of silence (a silent connection is closed without a word).
* A request's line, headers and body must all arrive within ``REQUEST_DEADLINE_S`` of its
  first byte, however the client paces them: a client that sends a byte every few seconds
  gets 408 and is closed, instead of holding a thread for ever.
* At most ``MAX_CONNECTIONS`` connections are served at once. One beyond them is not left
  waiting on a thread nobody will free: up to ``REFUSERS`` more are read (under
  ``REFUSE_TIMEOUT_S``) and answered 503 with ``Retry-After``, so that the client learns at
  once that the server is busy; past those a connection is closed as soon as it is accepted.
  The accept loop itself never blocks.
* The kernel queues up to ``BACKLOG`` connections not yet accepted.

At most ``retrieval.engine.MAX_DECODES`` images decode at once; an upload that finds them all
taken for ``DECODE_WAIT_S`` gets 503.
"""
from __future__ import annotations

import io
import json
import re
import socket
import sys
import threading
import time
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
REQUEST_DEADLINE_S = 60.0  # a request's line, headers and body arrive within this of its first byte (8 MiB: 140 KB/s)
MAX_CONNECTIONS = 128  # connections served at once, each on a thread of its own
REFUSERS = 8  # threads that answer the connections beyond MAX_CONNECTIONS with 503
REFUSE_TIMEOUT_S = 2.0  # how long such a connection has to send its request
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


class _DeadlineReader(io.RawIOBase):
    """A connection's reads, each bounded by the idle timeout and, once a request's first
    byte has arrived, by that request's deadline (``socket.timeout`` alone bounds one read:
    a byte now and then would hold it open for ever)."""

    def __init__(self, sock: socket.socket, idle_s: float | None, deadline_s: float | None):
        super().__init__()
        self.sock, self.idle_s, self.deadline_s = sock, idle_s, deadline_s
        self.deadline: float | None = None
        self.waiting = True  # for a request's first byte: until it comes, only the idle timeout runs
        self.expired = False  # a request did not arrive whole in time

    def readable(self) -> bool:
        return True

    def begin(self) -> None:
        """The next request starts with the next byte read."""
        self.deadline, self.waiting, self.expired = None, True, False

    def end(self) -> None:
        """The request has been read whole: the response's writes get the idle timeout."""
        self.deadline, self.waiting = None, False
        self.sock.settimeout(self.idle_s)

    def readinto(self, buffer: Any) -> int:
        timeout = self.idle_s
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                self.expired = True
                raise TimeoutError("the request did not arrive within its deadline")
            timeout = left if timeout is None else min(timeout, left)
        self.sock.settimeout(timeout)
        try:
            n = self.sock.recv_into(buffer)
        except TimeoutError:
            self.expired = not self.waiting  # silence mid-request: 408; between requests: just close
            raise
        if n and self.waiting:
            self.waiting = False
            if self.deadline_s is not None:
                self.deadline = time.monotonic() + self.deadline_s
        return n


def make_handler(engine: QueryEngine, quiet: bool = False, idle_timeout_s: float | None = IDLE_TIMEOUT_S,
                 request_deadline_s: float | None = REQUEST_DEADLINE_S) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to ``engine`` (its ``Refuser`` attribute: the class that
    answers every request 503, for connections beyond the server's limit)."""
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
        request_deadline = request_deadline_s

        def setup(self) -> None:
            super().setup()
            self.rfile.close()  # the plain buffered socket file: reads go through the deadline instead
            self._reader = _DeadlineReader(self.connection, self.timeout, self.request_deadline)
            self.rfile = io.BufferedReader(self._reader)

        def handle_one_request(self) -> None:
            self._reader.begin()
            super().handle_one_request()  # a read past the deadline ends it with close_connection set
            if self._reader.expired:
                self._request_timeout()

        def _request_timeout(self) -> None:
            """408, written whole: the request line may never have arrived, so none of the
            base class's response machinery (which reads it) can be used."""
            self.close_connection = True
            within = f" within {self.request_deadline:g} s" if self.request_deadline is not None else " in time"
            body = json.dumps({"error": f"the request did not arrive whole{within}"}).encode()
            head = (f"HTTP/1.1 {HTTPStatus.REQUEST_TIMEOUT.value} {HTTPStatus.REQUEST_TIMEOUT.phrase}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")
            try:
                self.connection.settimeout(self.timeout)
                self.wfile.write(head.encode() + body)
            except OSError:
                pass  # gone already

        def parse_request(self) -> bool:
            if not super().parse_request():
                return False
            if self.command != "POST":  # a POST's body is still to come (do_POST reads it)
                self._reader.end()
            return True

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
            if self.close_connection:  # the client learns not to send another request on it
                self.send_header("Connection", "close")
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
                body = self.rfile.read(int(length))
                self._reader.end()
                hits = _run(engine.search_image_bytes, body, k, over)
                self._json(HTTPStatus.OK, {"query": {"image": True, "over": over, "k": k}, "results": _public(hits)})
            except BadRequest as err:
                self.close_connection = True  # the body may be unread: never parse it as a request
                self._reader.end()
                self._error(err.status, str(err))

    class Refuser(Handler):
        """Reads a request (briefly) and answers 503: the server is serving all it may."""

        def parse_request(self) -> bool:
            if super().parse_request():
                self._reader.end()
                self.close_connection = True
                self._error(HTTPStatus.SERVICE_UNAVAILABLE, "the server is busy: too many connections")
            return False  # the base class then ends the request

    Handler.Refuser = Refuser
    return Handler


class SearchServer(ThreadingHTTPServer):
    """``ThreadingHTTPServer`` serving at most ``max_connections`` connections at once; the
    next ``refusers`` are answered 503 by ``handler.Refuser``, and any more are closed."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], *, backlog: int,
                 max_connections: int, refusers: int):
        self.request_queue_size = backlog  # read by server_activate, in the base __init__
        self._slots = threading.BoundedSemaphore(max_connections)
        self._spare = threading.BoundedSemaphore(refusers)
        self._refused: set[socket.socket] = set()
        super().__init__(address, handler)

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        if self._slots.acquire(blocking=False):
            super().process_request(request, client_address)
        elif self._spare.acquire(blocking=False):
            self._refused.add(request)
            super().process_request(request, client_address)
        else:  # every thread is taken, the refusers' too: closed, never queued on a thread
            self.shutdown_request(request)

    def finish_request(self, request: socket.socket, client_address: Any) -> None:
        handler = self.RequestHandlerClass.Refuser if request in self._refused else self.RequestHandlerClass
        handler(request, client_address, self)

    def handle_error(self, request: socket.socket, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # a client gone is no server error
            super().handle_error(request, client_address)

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            if request in self._refused:
                self._refused.discard(request)
                self._spare.release()
            else:
                self._slots.release()


def make_server(engine: QueryEngine, host: str = "127.0.0.1", port: int = 8000, quiet: bool = False, *,
                backlog: int = BACKLOG, idle_timeout_s: float | None = IDLE_TIMEOUT_S,
                request_deadline_s: float | None = REQUEST_DEADLINE_S, max_connections: int = MAX_CONNECTIONS,
                refusers: int = REFUSERS, refuse_timeout_s: float = REFUSE_TIMEOUT_S) -> SearchServer:
    """A bound, listening, not yet serving server (``port=0`` picks a free port: see
    ``server.server_address``).

    Args:
        backlog: connections the kernel queues before the server accepts them.
        idle_timeout_s: close a connection silent this long (``None``: never).
        request_deadline_s: answer 408 and close a connection whose request (line, headers
            and body) has not arrived whole this long after its first byte (``None``: never).
        max_connections: connections served at once.
        refusers: connections beyond ``max_connections`` answered 503 (any more are closed).
        refuse_timeout_s: how long those have to send their request.
    """
    handler = make_handler(engine, quiet, idle_timeout_s, request_deadline_s)
    brief = min(refuse_timeout_s, idle_timeout_s) if idle_timeout_s is not None else refuse_timeout_s
    handler.Refuser.timeout = handler.Refuser.request_deadline = brief
    return SearchServer((host, port), handler, backlog=backlog, max_connections=max_connections, refusers=refusers)
