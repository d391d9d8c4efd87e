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
