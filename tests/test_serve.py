"""The HTTP API: correct answers under 20 concurrent clients, bounds, and no path traversal."""
import http.client
import io
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import pytest
from PIL import Image

from clipalign.formats.folders import IndexFolder
from retrieval.engine import open_engine
from retrieval.server import MAX_K, make_server
from tests.retrieval_toy import make_index


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = make_index(tmp_path_factory.mktemp("serve"), n=48)
    engine = open_engine(folder, eager=True)
    server = make_server(engine, "127.0.0.1", 0, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield engine, server.server_address[1]
    server.shutdown()
    server.server_close()


def request(port, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type"), resp.read()
    finally:
        conn.close()


def test_binds_to_localhost_by_default(served):
    from clipalign.cli.serve import build_parser

    assert build_parser().parse_args(["--index", "x"]).host == "127.0.0.1"


def test_health_and_page(served):
    engine, port = served
    status, ctype, body = request(port, "GET", "/health")
    assert status == 200 and json.loads(body) == {"status": "ok", "count": 48, "dim": engine.index.dim,
                                                  "model": "ca-nano", "targets": ["image", "caption"]}
    status, ctype, body = request(port, "GET", "/")
    assert status == 200 and ctype.startswith("text/html") and b'id="q"' in body


def test_text_search_matches_the_library(served):
    engine, port = served
    status, _, body = request(port, "GET", "/search?text=" + quote("a red square") + "&k=5")
    assert status == 200
    got = json.loads(body)["results"]
    want = engine.search_texts(["a red square"], 5)[0]
    assert [h["id"] for h in got] == [h["id"] for h in want]
    assert [h["score"] for h in got] == pytest.approx([h["score"] for h in want], abs=1e-5)
    assert "shard" not in got[0] and "offset" not in got[0]  # server paths stay private


def test_image_upload_finds_the_same_image(served):
    engine, port = served
    row = engine.index.rows([5])[0]
    from retrieval.sources import read_image_bytes

    status, _, body = request(port, "POST", "/search?k=3", body=read_image_bytes(row), headers={"Content-Type": "image/jpeg"})
    assert status == 200
    best = json.loads(body)["results"][0]
    assert best["id"] == 5 and best["score"] > 0.99


def test_twenty_concurrent_clients_all_get_correct_answers(served):
    engine, port = served
    queries = [f"a {c} square number {i}" for i in range(5) for c in ("red", "green", "blue", "yellow")]
    want = {q: [h["id"] for h in engine.search_texts([q], 4)[0]] for q in queries}

    def one(q):
        status, _, body = request(port, "GET", "/search?text=" + quote(q) + "&k=4")
        return q, status, [h["id"] for h in json.loads(body)["results"]]

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, queries * 3))
    assert len(results) == 60
    for q, status, ids in results:
        assert status == 200 and ids == want[q]


def test_thumbnails_are_served_by_row(served):
    _, port = served
    status, ctype, body = request(port, "GET", "/thumb/3")
    assert status == 200 and ctype == "image/jpeg"
    with Image.open(io.BytesIO(body)) as img:
        assert img.format == "JPEG" and max(img.size) >= 96


FILES = IndexFolder("")  # the index folder's own files are never served


@pytest.mark.parametrize("path", [
    "/thumb/48", "/thumb/-1", "/thumb/../../etc/passwd", "/thumb/%2e%2e%2fetc%2fpasswd", "/../etc/passwd",
    "/thumb/1/../../../etc/passwd", f"/static/../../{FILES.info.name}", f"/{FILES.model.name}",
    f"/{FILES.info.name}", "/thumb/99999999999999",
    "//etc/passwd", "/thumb/3%00.jpg",
])
def test_path_traversal_and_unknown_paths_get_404(served, path):
    _, port = served
    status, _, _ = request(port, "GET", path)
    assert status == 404


@pytest.mark.parametrize("query, status", [
    ("text=a&k=0", 400), (f"text=a&k={MAX_K + 1}", 400), ("text=a&k=x", 400), ("text=", 400),
    ("text=" + "a" * 1001, 400), ("text=a&over=everything", 400), (f"text=a&k={MAX_K}", 200),
])
def test_bounds(served, query, status):
    _, port = served
    assert request(port, "GET", "/search?" + query)[0] == status


def test_upload_limits(served):
    _, port = served
    assert request(port, "POST", "/search?k=3", body=b"not an image")[0] == 400
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest("POST", "/search?k=3")
    conn.putheader("Content-Length", str(100 << 20))
    conn.endheaders()
    assert conn.getresponse().status == 413  # refused before the body is read
    conn.close()


# --- untrusted uploads, many clients, idle sockets ---------------------------------------------

def _upload(port, body, timeout=30):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/search?k=3", body=body, headers={"Content-Type": "image/png"})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Retry-After"), json.loads(resp.read())
    finally:
        conn.close()


@pytest.fixture(scope="module")
def bomb():
    from tests.hostile_inputs import big_png

    return big_png(9500, 9500)  # 90 Mpx in ~280 KB: decoded, 270 MB at least


@pytest.fixture(scope="module")
def small_image(served):
    from retrieval.sources import read_image_bytes

    engine, _ = served
    return read_image_bytes(engine.index.rows([5])[0])


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_pixel_bomb_upload_is_refused_before_it_is_decoded(served, bomb):
    _, port = served
    status, _, body = _upload(port, bomb)
    assert status == 400 and "image_too_large" in body["error"] and "9500x9500" in body["error"]


def _peak_rss(pid: int) -> int:
    """The process's peak resident memory (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmHWM:"))


def test_the_server_process_memory_does_not_jump_for_a_bomb(served, bomb, small_image):
    import os
    import re
    import select
    import subprocess
    import sys
    import time

    engine, _ = served
    proc = subprocess.Popen([sys.executable, "-m", "clipalign", "serve", "--index", str(engine.index.folder),
                             "--port", "0", "--quiet"], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        line, deadline = "", time.monotonic() + 120
        while "serving" not in line and time.monotonic() < deadline and proc.poll() is None:
            if select.select([proc.stderr], [], [], 1.0)[0]:
                line = proc.stderr.readline()
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/", line).group(1))
        assert _upload(port, small_image)[0] == 200  # everything an upload needs is built and warm
        before = _peak_rss(proc.pid)
        status, _, body = _upload(port, bomb)
        assert status == 400 and "image_too_large" in body["error"]
        assert _peak_rss(proc.pid) - before < 64 << 20  # decoding would have taken 270 MB and more
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def limited(served):
    """A second server over the same index whose engine decodes one image at a time."""
    engine, _ = served
    limited = open_engine(engine.index.folder, eager=True, max_decodes=1, decode_wait_s=0.2)
    server = make_server(limited, "127.0.0.1", 0, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield limited, server.server_address[1]
    server.shutdown()
    server.server_close()


def test_an_upload_that_finds_every_decode_slot_taken_gets_503_quickly(limited, small_image):
    import time

    engine, port = limited
    with engine.decode_slot():  # another upload is decoding
        t0 = time.perf_counter()
        status, retry, body = _upload(port, small_image)
        assert status == 503 and retry == "1" and "try again" in body["error"] and time.perf_counter() - t0 < 5
    assert _upload(port, small_image)[0] == 200


def test_concurrent_decodes_never_exceed_the_bound(served, small_image, monkeypatch):
    import clipalign.formats.images as images  # the engine imports its decoder at the first image query

    engine, _ = served
    bounded = open_engine(engine.index.folder, eager=True, max_decodes=2, decode_wait_s=30)
    active, peak, lock = [0], [0], threading.Lock()
    both_in = threading.Barrier(2, timeout=30)  # each decode waits for a second one: the bound is reached
    real = images.decode_image

    def paired_decode(*args, **kwargs):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        both_in.wait()  # a timeout (BrokenBarrierError) means the second slot never let one in
        try:
            return real(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(images, "decode_image", paired_decode)
    with ThreadPoolExecutor(8) as pool:
        hits = list(pool.map(lambda _: bounded.search_image_bytes(small_image, 1)[0][0]["id"], range(16)))
    assert hits == [5] * 16 and peak[0] == 2


def _connected(port: int, n: int, wait_s: float) -> int:
    """How many of ``n`` simultaneous connects complete the TCP handshake within ``wait_s``."""
    import select
    import socket
    import time

    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            socks.append(s)
        pending, done, deadline = set(socks), 0, time.monotonic() + wait_s
        while pending and time.monotonic() < deadline:
            _, writable, _ = select.select([], list(pending), [], max(0.0, deadline - time.monotonic()))
            for s in writable:
                pending.discard(s)
                done += s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        return done
    finally:
        for s in socks:
            s.close()


def test_fifty_clients_connecting_at_once_are_all_queued(served):
    engine, _ = served
    server = make_server(engine, "127.0.0.1", 0, quiet=True)  # listening, not accepting: the kernel queues
    try:
        assert _connected(server.server_address[1], 50, wait_s=0.5) == 50
    finally:
        server.server_close()
    legacy = make_server(engine, "127.0.0.1", 0, quiet=True, backlog=5)  # socketserver's default
    try:
        # the rest of the SYNs are dropped: each of those clients would wait 1 s, then 3 s, to retry
        assert _connected(legacy.server_address[1], 50, wait_s=0.5) < 10
    finally:
        legacy.server_close()


def test_an_idle_connection_is_closed_and_frees_its_thread(served):
    import socket
    import time

    engine, _ = served
    server = make_server(engine, "127.0.0.1", 0, quiet=True, idle_timeout_s=0.5)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        silent = socket.create_connection(server.server_address, timeout=10)
        kept = http.client.HTTPConnection(*server.server_address, timeout=10)
        kept.request("GET", "/health")
        assert kept.getresponse().read() and threading.active_count() >= 3
        t0 = time.perf_counter()
        assert silent.recv(1) == b""  # the server hung up on the silent client
        assert time.perf_counter() - t0 < 5
        kept.sock.settimeout(10)
        assert kept.sock.recv(1) == b""  # and on the one that went quiet after its request
        silent.close()
        kept.close()
    finally:
        server.shutdown()
        server.server_close()


def test_fifty_keep_alive_clients_all_get_answers(served):
    engine, port = served
    want = [h["id"] for h in engine.search_texts(["a blue square"], 3)[0]]

    def client(i):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            got = []
            for _ in range(4):  # one connection, kept alive
                conn.request("GET", "/search?text=" + quote("a blue square") + "&k=3")
                resp = conn.getresponse()
                got.append((resp.status, [h["id"] for h in json.loads(resp.read())["results"]]))
            return got
        finally:
            conn.close()

    with ThreadPoolExecutor(50) as pool:
        results = [r for rs in pool.map(client, range(50)) for r in rs]
    assert len(results) == 200 and all(r == (200, want) for r in results)
