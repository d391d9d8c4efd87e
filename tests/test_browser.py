"""The search page in a real headless browser (Debian's chromium through Playwright): type a query, see images.

Set CLIPALIGN_SCREENSHOT=path/to.png to keep a screenshot of the result page.
"""
import os
import shutil
import threading

import pytest

from retrieval.engine import open_engine
from retrieval.server import make_server
from tests.retrieval_toy import make_index

CHROMIUM = os.environ.get("CLIPALIGN_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    folder = make_index(tmp_path_factory.mktemp("browser"), n=32)
    server = make_server(open_engine(folder), "127.0.0.1", 0, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_typing_a_query_shows_result_images(url, tmp_path):
    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: run 'make test' (it installs Debian's chromium) or apt-get install chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            page.goto(url)
            page.fill("#q", "a red square")
            page.fill("#k", "8")
            page.press("#q", "Enter")
            page.wait_for_selector(".hit img", timeout=20_000)
            page.wait_for_function(
                "() => [...document.querySelectorAll('.hit img')].every(i => i.complete && i.naturalWidth > 0)",
                timeout=20_000)
            assert page.locator(".hit").count() == 8
            assert page.inner_text("#status") == "8 results"
            captions = page.locator(".hit .caption").all_inner_texts()
            assert all(c.endswith("square") for c in captions)
            scores = [float(s) for s in page.locator(".hit .score").all_inner_texts()]
            assert scores == sorted(scores, reverse=True)
            page.screenshot(path=os.environ.get("CLIPALIGN_SCREENSHOT") or str(tmp_path / "page.png"), full_page=True)
        finally:
            browser.close()
