"""A loopback HTTP server for the downloader tests (no network needed)."""
from __future__ import annotations

import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

Route = Callable[[BaseHTTPRequestHandler], None]


def send(handler: BaseHTTPRequestHandler, body: bytes, ctype: str = "image/png", status: int = 200,
         headers: dict[str, str] | None = None, length: int | None = None) -> None:
    """Send one response; ``length`` overrides Content-Length (to fake a truncated body).

    A body shorter than its Content-Length ends with the connection closing, as a broken
    transfer does (on a kept-alive connection the client would wait for the rest instead).
    """
    handler.send_response(status)
    handler.send_header("Content-Type", ctype)
    handler.send_header("Content-Length", str(len(body) if length is None else length))
    for k, v in (headers or {}).items():
        handler.send_header(k, v)
    handler.end_headers()
    handler.wfile.write(body)
    if length is not None and length > len(body):
        handler.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # The listen backlog (5 by default): when more clients connect at once than it holds,
    # the kernel drops their SYNs and they retry a second later, past the tests' timeouts.
    request_queue_size = 128

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that gave up (a timeout test) leaves a broken pipe here: expected, not printed.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class LoopbackServer:
    """Serve ``routes`` (path -> handler function) on 127.0.0.1 in a background thread.

    Unknown paths get a 404. ``hits`` counts requests per path; ``peers`` lists each
    request's client port (one port for several requests: a kept-alive connection).
    """

    def __init__(self, routes: dict[str, Route]) -> None:
        self.routes = routes
        self.hits: dict[str, int] = {}
        self.peers: list[int] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers
            disable_nagle_algorithm = True  # TCP_NODELAY, as real servers: else each kept-alive request waits 40 ms

            def do_GET(self) -> None:  # noqa: N802
                path = self.path.split("?")[0]
                server.hits[path] = server.hits.get(path, 0) + 1
                server.peers.append(self.client_address[1])
                route = server.routes.get(path)
                if route is None:
                    send(self, b"not found", "text/plain", 404)
                else:
                    route(self)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> LoopbackServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def slow(seconds: float, then: Route) -> Route:
    """A route that waits ``seconds`` before answering like ``then``."""
    def route(handler: BaseHTTPRequestHandler) -> None:
        time.sleep(seconds)
        then(handler)
    return route
