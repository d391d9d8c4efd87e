"""Get an image's bytes: from a local file, or over HTTP(S) with retries and limits.

``fetch_url`` uses only the standard library (``urllib``). Every failure raises
``FetchError`` with a stable ``reason`` (counted in ``stats.json``) and a detail.
Transient failures (connection errors, truncated bodies, HTTP 429 and 5xx) are retried
with exponential backoff; the rest fail at once.
"""
from __future__ import annotations

import http.client
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
NOT_FOUND = "http_not_found"
HTTP_ERROR = "http_error"
TIMEOUT = "timeout"
CONNECTION_ERROR = "connection_error"
TRUNCATED = "truncated_download"
TOO_LARGE = "too_large"
NOT_AN_IMAGE = "not_an_image"
ROBOTS_NOAI = "robots_noai"

DEFAULT_USER_AGENT = "clipalign-prep/1.0 (image-text dataset builder)"
# X-Robots-Tag directives asking not to use the content for AI training (as img2dataset honours).
NOAI_DIRECTIVES: frozenset[str] = frozenset({"noai", "noimageai"})
_CHUNK = 1 << 16


class FetchError(Exception):
    """Getting the bytes failed; ``reason`` is a stable skip reason."""

    def __init__(self, reason: str, detail: str, transient: bool = False) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.transient = transient


@dataclass(frozen=True)
class FetchConfig:
    """Download limits.

    Attributes:
        timeout: Seconds for the whole request (connect, headers and body).
        retries: Extra attempts after a transient failure.
        backoff: Seconds before the first retry; doubled for each further one.
        max_bytes: Largest body accepted (also applies to local files).
        user_agent: ``User-Agent`` header sent.
        check_content_type: Refuse bodies whose ``Content-Type`` is set and is neither ``image/*``
            nor ``application/octet-stream``.
        respect_robots: Skip responses whose ``X-Robots-Tag`` holds ``noai`` or ``noimageai``.
    """

    timeout: float = 10.0
    retries: int = 2
    backoff: float = 0.5
    max_bytes: int = 32 * 2**20
    user_agent: str = DEFAULT_USER_AGENT
    check_content_type: bool = True
    respect_robots: bool = True


def read_local(path: Path | None, max_bytes: int | None = None) -> bytes:
    """Read a local image file.

    Raises:
        FetchError: ``missing_image``, ``unreadable_image`` or ``too_large``.
    """
    if path is None or not path.is_file():
        raise FetchError(MISSING_IMAGE, f"no such file: {path}")
    try:
        if max_bytes is not None and path.stat().st_size > max_bytes:
            raise FetchError(TOO_LARGE, f"{path.stat().st_size} bytes > {max_bytes}")
        return path.read_bytes()
    except OSError as err:
        raise FetchError(UNREADABLE_IMAGE, f"{type(err).__name__}: {err}") from None


def robots_forbid(values: list[str]) -> str | None:
    """The ``noai``-like directive in ``X-Robots-Tag`` header values, if any.

    Values look like ``"noai, noimageai"`` or ``"otherbot: noindex"``; a directive
    scoped to a named bot still counts, as we cannot know which bots the host means.
    """
    for value in values:
        for part in value.split(","):
            token = part.rsplit(":", 1)[-1].strip().lower()
            if token in NOAI_DIRECTIVES:
                return token
    return None


def _fetch_once(url: str, config: FetchConfig, clock: Callable[[], float]) -> bytes:
    start = clock()
    request = Request(url, headers={"User-Agent": config.user_agent, "Accept": "image/*,*/*;q=0.5"})
    try:
        response = urlopen(request, timeout=config.timeout)
    except HTTPError as err:
        err.close()
        reason = NOT_FOUND if err.code in (404, 410) else HTTP_ERROR
        raise FetchError(reason, f"HTTP {err.code}", transient=err.code == 429 or err.code >= 500) from None
    except (TimeoutError, socket.timeout) as err:
        raise FetchError(TIMEOUT, f"no response within {config.timeout} s ({err})") from None
    except URLError as err:
        if isinstance(err.reason, (TimeoutError, socket.timeout)):
            raise FetchError(TIMEOUT, f"no response within {config.timeout} s") from None
        raise FetchError(CONNECTION_ERROR, str(err.reason), transient=True) from None
    except (http.client.HTTPException, OSError, ValueError) as err:
        raise FetchError(CONNECTION_ERROR, f"{type(err).__name__}: {err}", transient=True) from None
    with response:
        return _read_body(response, config, start, clock)


def _read_body(response: http.client.HTTPResponse, config: FetchConfig, start: float, clock: Callable[[], float]) -> bytes:
    headers = response.headers
    if config.respect_robots and (directive := robots_forbid(headers.get_all("X-Robots-Tag") or [])):
        raise FetchError(ROBOTS_NOAI, f"X-Robots-Tag: {directive}")
    ctype = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if config.check_content_type and ctype and not (ctype.startswith("image/") or ctype == "application/octet-stream"):
        raise FetchError(NOT_AN_IMAGE, f"Content-Type: {ctype}")
    length = headers.get("Content-Length")
    expected = int(length) if length and length.isdigit() else None
    if expected is not None and expected > config.max_bytes:
        raise FetchError(TOO_LARGE, f"Content-Length {expected} > {config.max_bytes}")
    chunks: list[bytes] = []
    size = 0
    try:
        while chunk := response.read(_CHUNK):
            chunks.append(chunk)
            size += len(chunk)
            if size > config.max_bytes:
                raise FetchError(TOO_LARGE, f"body > {config.max_bytes} bytes")
            if clock() - start > config.timeout:
                raise FetchError(TIMEOUT, f"body not complete within {config.timeout} s")
    except http.client.IncompleteRead as err:
        raise FetchError(TRUNCATED, f"got {size + len(err.partial)} of {expected} bytes", transient=True) from None
    except (TimeoutError, socket.timeout):
        raise FetchError(TIMEOUT, f"body not complete within {config.timeout} s") from None
    except (http.client.HTTPException, OSError) as err:
        raise FetchError(CONNECTION_ERROR, f"{type(err).__name__}: {err}", transient=True) from None
    if expected is not None and size < expected:
        raise FetchError(TRUNCATED, f"got {size} of {expected} bytes", transient=True)
    return b"".join(chunks)


def fetch_url(
    url: str,
    config: FetchConfig = FetchConfig(),
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> bytes:
    """Download ``url`` (following redirects), retrying transient failures.

    Raises:
        FetchError: with the reason of the last attempt.
    """
    attempt = 0
    while True:
        try:
            return _fetch_once(url, config, clock)
        except FetchError as err:
            if not err.transient or attempt >= config.retries:
                raise
        sleep(config.backoff * 2**attempt)
        attempt += 1
