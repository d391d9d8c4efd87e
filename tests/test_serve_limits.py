"""The server against clients that hold on: a request dripped byte by byte meets its deadline,
and connections past the limit are answered 503 or closed, never left holding threads.

Each test runs a live server on 127.0.0.1 with short limits; every client loop is bounded.
"""
import contextlib
import http.client
import socket
import threading
import time

import pytest

from retrieval.engine import open_engine
from retrieval.server import make_server
from tests.retrieval_toy import make_index

GIVE_UP_S = 20.0  # a client loop that runs this long has found a server that never answers


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return open_engine(make_index(tmp_path_factory.mktemp("limits"), n=16), eager=True)


@contextlib.contextmanager
def serving(engine, **options):
    server = make_server(engine, "127.0.0.1", 0, quiet=True, **options)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def drip(port: int, head: bytes, body: bytes, pace_s: float = 0.2) -> tuple[bytes, float]:
    """Send ``head`` at once, then ``body`` one byte per ``pace_s`` (the wait for an answer
    between bytes); returns what the server sent before closing, and the seconds since the
    first byte. Gives up (returning what it has) after ``GIVE_UP_S``."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        start = time.monotonic()
        sock.sendall(head)
        got, sent = b"", 0
        while time.monotonic() - start < GIVE_UP_S:
            if sent < len(body):
                try:
                    sock.sendall(body[sent:sent + 1])
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the server hung up: its answer may still be waiting to be read
                sent += 1
            sock.settimeout(pace_s)
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            got += chunk
        return got, time.monotonic() - start


def status_of(port: int, timeout: float = 10) -> int | None:
    """The status a fresh connection gets for ``GET /health``; None if closed without an answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status
    except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
        return None
    finally:
        conn.close()


def test_headers_dripped_past_the_deadline_get_408(engine):
    # the idle timeout (30 s) is never reached at a byte per 0.2 s: only the deadline ends it
    with serving(engine, idle_timeout_s=30, request_deadline_s=1.0) as port:
        got, elapsed = drip(port, b"GET /health HTTP/1.1\r\n", b"X-Slow: " + b"a" * 1000)
    assert got.startswith(b"HTTP/1.1 408 "), got[:200]
    assert b"within 1 s" in got and b"Connection: close" in got
    assert 1.0 <= elapsed < 10, elapsed


def test_a_body_dripped_past_the_deadline_gets_408(engine):
    head = b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
    with serving(engine, idle_timeout_s=30, request_deadline_s=1.0) as port:
        got, elapsed = drip(port, head, b"\x89PNG" + b"\x00" * 1000)
    assert got.startswith(b"HTTP/1.1 408 "), got[:200]
    assert 1.0 <= elapsed < 10, elapsed


def test_the_deadline_runs_per_request_not_between_requests(engine):
    with serving(engine, idle_timeout_s=30, request_deadline_s=0.5) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", "/health")
            first = conn.getresponse()
            first.read()
            time.sleep(1.0)  # kept alive, idle past the request deadline (within the idle timeout)
            conn.request("GET", "/health")
            second = conn.getresponse()
            assert (first.status, second.status, second.read()[:1]) == (200, 200, b"{")
        finally:
            conn.close()


def test_silence_between_requests_is_closed_without_a_408(engine):
    with serving(engine, idle_timeout_s=0.5, request_deadline_s=5.0) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as silent:
            assert silent.recv(100) == b""  # closed, and not told 408: it sent no request


def test_connections_past_the_limit_get_503_until_one_frees(engine):
    with serving(engine, max_connections=2, refusers=1, refuse_timeout_s=5.0) as port:
        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        try:
            # accepted in order, so both hold a thread before this one is seen
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/health")
            busy = conn.getresponse()
            assert busy.status == 503 and busy.getheader("Retry-After") == "1"
            assert b"too many connections" in busy.read()
            assert busy.getheader("Connection") == "close"
            conn.close()
            held.pop().close()
            deadline, status = time.monotonic() + GIVE_UP_S, None
            while status != 200 and time.monotonic() < deadline:  # until the freed thread is released
                status = status_of(port)
            assert status == 200
        finally:
            for sock in held:
                sock.close()


def test_past_the_refusers_a_connection_is_closed_at_once(engine):
    with serving(engine, max_connections=1, refusers=1, refuse_timeout_s=0.5) as port:
        served = socket.create_connection(("127.0.0.1", port), timeout=10)
        refused = socket.create_connection(("127.0.0.1", port), timeout=10)  # a refuser waits for its request
        try:
            assert status_of(port) is None  # no thread left to answer it: closed, not queued
            start = time.monotonic()
            assert refused.recv(100) == b""  # the refuser gave up on the silent client ...
            assert time.monotonic() - start < 5
            deadline, status = time.monotonic() + GIVE_UP_S, None
            while status != 503 and time.monotonic() < deadline:  # ... and answers the next one
                status = status_of(port)
            assert status == 503
        finally:
            served.close()
            refused.close()
