"""Downloads against a loopback HTTP server: each failure ends in its counted reason, nothing else is lost."""
from __future__ import annotations

import csv
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import pytest
from PIL import Image

from data_prep import fetch
from data_prep.fetch import Downloader, FetchConfig, FetchError, fetch_url, retry_after, robots_forbid
from data_prep.manifest import open_records
from data_prep.prep import PrepConfig, run_prep
from data_prep.sample import SampleConfig
from tests.prep_server import LoopbackServer, send, slow

FAST = FetchConfig(timeout=0.5, retries=2, backoff=0.01, max_bytes=20_000)


def _png(colour: tuple[int, int, int], size: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, "PNG")
    return buf.getvalue()


GOOD = _png((200, 10, 10))


def _flaky(failures: list[int | tuple[int, dict[str, str]]]):
    """Answers with the status codes (and headers) in ``failures`` first, then with the image."""
    def route(h):
        if failures:
            status, headers = failures.pop(0) if isinstance(failures[0], tuple) else (failures.pop(0), {})
            send(h, b"busy", "text/plain", status, headers)
        else:
            send(h, GOOD)
    return route


def _redirect(to: str):
    def route(h):
        h.send_response(302)
        h.send_header("Location", to)
        h.send_header("Content-Length", "0")
        h.end_headers()
    return route


def _routes() -> dict:
    return {
        "/good.png": lambda h: send(h, GOOD),
        "/good2.png": lambda h: send(h, _png((10, 200, 10))),
        "/octet": lambda h: send(h, _png((10, 10, 200)), "application/octet-stream"),
        "/redirect": _redirect("/good2.png"),
        "/loop": _redirect("/loop"),
        "/to-file": _redirect("file:///etc/hostname"),  # a redirect must never read a local file
        "/slow": slow(1.5, lambda h: send(h, GOOD)),
        "/truncated": lambda h: send(h, GOOD[: len(GOOD) // 2], length=len(GOOD)),
        "/page.html": lambda h: send(h, b"<html>hi</html>", "text/html"),
        "/huge.png": lambda h: send(h, b"\0" * 50_000),
        "/huge-chunked": lambda h: _chunked(h, 50_000),
        "/noai": lambda h: send(h, GOOD, headers={"X-Robots-Tag": "noai"}),
        "/noimageai": lambda h: send(h, GOOD, headers={"X-Robots-Tag": "googlebot: noindex, otherbot: noimageai"}),
        "/busy-then-ok": _flaky([503, 429]),
        "/always-500": lambda h: send(h, b"err", "text/plain", 500),
        "/forbidden": lambda h: send(h, b"no", "text/plain", 403),
        "/garbage.png": lambda h: send(h, b"not an image at all"),
    }


def _chunked(h, n: int) -> None:
    # No Content-Length: the size limit must hold while reading.
    h.send_response(200)
    h.send_header("Content-Type", "image/png")
    h.send_header("Connection", "close")
    h.end_headers()
    h.wfile.write(b"\0" * n)
    h.close_connection = True


@pytest.fixture(scope="module")
def server():
    with LoopbackServer(_routes()) as s:
        yield s


CASES = {
    "/good.png": None,
    "/octet": None,
    "/redirect": None,
    "/busy-then-ok": None,
    "/missing.png": fetch.NOT_FOUND,
    "/loop": fetch.HTTP_ERROR,
    "/to-file": fetch.CONNECTION_ERROR,
    "/slow": fetch.TIMEOUT,
    "/truncated": fetch.TRUNCATED,
    "/page.html": fetch.NOT_AN_IMAGE,
    "/huge.png": fetch.TOO_LARGE,
    "/huge-chunked": fetch.TOO_LARGE,
    "/noai": fetch.ROBOTS_NOAI,
    "/noimageai": fetch.ROBOTS_NOAI,
    "/always-500": fetch.HTTP_ERROR,
    "/forbidden": fetch.HTTP_ERROR,
}


@pytest.mark.parametrize("path", [p for p in CASES if p != "/slow"])
def test_fetch_url_outcomes(server, path):
    expected = CASES[path]
    if expected is None:
        assert Image.open(io.BytesIO(fetch_url(server.base + path, FAST))).size == (24, 24)
    else:
        with pytest.raises(FetchError) as err:
            fetch_url(server.base + path, FAST)
        assert err.value.reason == expected


def test_retries_transient_failures_with_backoff(server):
    sleeps: list[float] = []
    server.routes["/flaky"] = _flaky([500, 502, 429])
    config = FetchConfig(retries=3, backoff=0.5)
    assert fetch_url(server.base + "/flaky", config, sleep=sleeps.append) == GOOD
    assert sleeps == [0.5, 1.0, 2.0] and server.hits["/flaky"] == 4
    server.routes["/flaky2"] = _flaky([503, 503])
    with pytest.raises(FetchError) as err:
        fetch_url(server.base + "/flaky2", FetchConfig(retries=1, backoff=0), sleep=sleeps.append)
    assert err.value.reason == fetch.HTTP_ERROR and server.hits["/flaky2"] == 2
    before = server.hits.get("/forbidden", 0)
    with pytest.raises(FetchError):
        fetch_url(server.base + "/forbidden", FetchConfig(retries=3, backoff=0))
    assert server.hits["/forbidden"] == before + 1  # a 403 is not retried


def test_retry_after_is_honoured_up_to_a_cap(server):
    sleeps: list[float] = []
    server.routes["/rate-limited"] = _flaky([
        (429, {"Retry-After": "3"}),  # longer than the backoff (0.5 s): wait 3 s
        (503, {"Retry-After": "3600"}),  # capped
        (503, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}),  # a date in the past: the backoff (2 s)
        (500, {"Retry-After": "5"}),  # only 429 and 503 carry it: the backoff (4 s)
        (429, {"Retry-After": "soon"}),  # invalid: the backoff (8 s)
    ])
    config = FetchConfig(retries=5, backoff=0.5)
    assert fetch_url(server.base + "/rate-limited", config, sleep=sleeps.append) == GOOD
    assert sleeps == [3.0, fetch.MAX_WAIT, 2.0, 4.0, 8.0]


def test_connections_are_kept_alive(server):
    before = len(server.peers)
    with Downloader() as downloader:
        for path in ("/good.png", "/missing.png", "/redirect", "/page.html", "/good.png"):
            try:
                downloader.fetch(server.base + path, FAST)
            except FetchError:
                pass  # a refused answer's short body is read, so its connection serves the next request
        assert len(server.peers) == before + 6 and len(set(server.peers[before:])) == 1  # the redirect is 2 requests
        server.routes["/past-the-drain-limit.png"] = lambda h: send(h, b"\0" * (2 * fetch._DRAIN_LIMIT))
        with pytest.raises(FetchError):
            downloader.fetch(server.base + "/past-the-drain-limit.png", FAST)  # a long body is not read: closed
        assert downloader.fetch(server.base + "/good.png", FAST) == GOOD
        assert server.peers[-1] != server.peers[-2]


def test_threads_share_one_downloader_each_on_its_own_connection(server):
    open_now, most = [0], [0]
    lock = threading.Lock()
    all_in = threading.Barrier(3, timeout=30)  # each request is answered once 3 are in: 3 at once, every time

    def route(h):
        with lock:
            open_now[0] += 1
            most[0] = max(most[0], open_now[0])
        all_in.wait()  # a timeout (BrokenBarrierError) means the 3 threads never had 3 requests out at once
        with lock:
            open_now[0] -= 1
        send(h, GOOD)
    server.routes["/counted.png"] = route
    before = len(server.peers)
    with Downloader() as downloader, ThreadPoolExecutor(3) as pool:
        patient = FetchConfig(timeout=30, retries=0, max_bytes=20_000)  # a retry would open a 4th connection
        got = list(pool.map(lambda _: downloader.fetch(server.base + "/counted.png", patient), range(24)))
        assert len(downloader._handles) == 3
    assert got == [GOOD] * 24
    assert most[0] == 3 and len(set(server.peers[before:])) == 3  # 3 at once, on 3 kept-alive connections
    assert downloader._handles == []  # closed


def test_a_body_that_trickles_past_the_timeout_times_out(server):
    def trickle(h):  # 20 pieces 50 ms apart: the headers come at once, the whole body in 1 s
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        h.send_header("Content-Length", str(20 * 16))
        h.end_headers()
        for _ in range(20):
            h.wfile.write(b"\0" * 16)
            h.wfile.flush()
            time.sleep(0.05)
    server.routes["/trickle.png"] = trickle
    with pytest.raises(FetchError) as err:
        fetch_url(server.base + "/trickle.png", FetchConfig(timeout=0.3, retries=0))
    assert err.value.reason == fetch.TIMEOUT


def test_retry_after_values():
    now = datetime(2015, 10, 21, 7, 28, 0, tzinfo=timezone.utc)
    assert retry_after("120", now) == 120.0 and retry_after(" 7 ", now) == 7.0
    assert retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now) == 30.0
    assert retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now) == 0.0  # a date in the past: no wait
    assert retry_after("soon", now) is None and retry_after("-5", now) is None and retry_after(None) is None


def test_options_relax_the_checks(server):
    relaxed = FetchConfig(timeout=0.5, respect_robots=False, check_content_type=False)
    assert fetch_url(server.base + "/noai", relaxed) == GOOD
    assert fetch_url(server.base + "/page.html", relaxed) == b"<html>hi</html>"


def test_user_agent_is_sent(server):
    agents = []

    def route(h):
        agents.append(h.headers["User-Agent"])
        send(h, GOOD)
    server.routes["/ua"] = route
    fetch_url(server.base + "/ua", FetchConfig(user_agent="my-bot/2"))
    assert agents == ["my-bot/2"]


def test_robots_directives():
    assert robots_forbid(["noai"]) == "noai"
    assert robots_forbid(["noindex, NoImageAI"]) == "noimageai"
    assert robots_forbid(["otherbot: noai"]) == "noai"
    assert robots_forbid(["noindex", "nofollow"]) is None and robots_forbid([]) is None


def test_connection_refused_is_a_connection_error():
    details = []
    for _ in range(2):
        with pytest.raises(FetchError) as err:
            fetch_url("http://127.0.0.1:9/x.png", FetchConfig(retries=0))
        assert err.value.reason == fetch.CONNECTION_ERROR and err.value.transient
        details.append(err.value.detail)
    assert details[0] == details[1] and " ms" not in details[0]  # details are reproducible: no timings


@pytest.mark.parametrize("workers", [1, 2])  # 2: forked workers open their own connections
def test_prep_from_urls_counts_every_reason(server, tmp_path, read_shards, workers):
    paths = list(CASES) + ["/garbage.png"]
    manifest = tmp_path / "urls.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["url", "text", "license"])
        w.writerows([server.base + p, f"caption {i}", "cc-by"] for i, p in enumerate(paths))
    config = PrepConfig(SampleConfig(image_size=16, fetch=FAST), shard_size=4, workers=workers, threads=4)
    stats = run_prep(open_records(manifest, image_col="url", caption_col="text", extra_cols=None), tmp_path / "out",
                     config)
    expected = {p: r for p, r in CASES.items()} | {"/garbage.png": "undecodable_image"}
    good = [i for i, p in enumerate(paths) if expected[p] is None]
    bad = {i: expected[p] for i, p in enumerate(paths) if expected[p] is not None}
    assert stats["seen"] == len(paths) and stats["written"] == len(good)
    errors = [json.loads(line) for line in (tmp_path / "out/errors.jsonl").read_text().splitlines()]
    assert {e["index"]: e["reason"] for e in errors} == bad
    sizes = json.loads((tmp_path / "out/sizes.json").read_text())
    samples = read_shards([tmp_path / "out" / name for name in sizes])
    assert [int(s["__key__"]) for s in samples] == good
    assert all(s["json"]["license"] == "cc-by" and s["json"]["source"].startswith("http") for s in samples)
