"""Get an image's bytes: from a local file, or over HTTP(S) with retries and limits.

``fetch_url`` downloads with urllib3 through one connection pool per process, so the
threads of a worker reuse keep-alive connections to a host instead of opening one per
image. Every failure raises ``FetchError`` with a stable ``reason`` (counted in
``stats.json``) and a detail. Transient failures (connection errors, truncated bodies,
HTTP 429 and 5xx) are retried with exponential backoff, or after the server's
``Retry-After`` on 429 and 503 when that is longer; the rest fail at once.
"""
from __future__ import annotations

import functools
import http.client
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import urllib3
from urllib3.exceptions import (
    HTTPError,
    InvalidHeader,
    LocationValueError,
    MaxRetryError,
    NewConnectionError,
    ProtocolError,
    ResponseError,
)
from urllib3.exceptions import TimeoutError as Urllib3Timeout

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
RETRY_AFTER_STATUSES: frozenset[int] = frozenset({429, 503})
MAX_WAIT = 30.0  # seconds: the longest wait before a retry, whatever the backoff or Retry-After say
MAX_REDIRECTS = 10  # as urllib and browsers
_CHUNK = 1 << 16
# Pool sizes: hosts whose idle connections are kept (least recently used first out), and
# connections kept per host (at least the threads of a worker, or urllib3 drops and warns).
_POOL_HOSTS = 32
_POOL_CONNECTIONS_PER_HOST = 256
# urllib3 follows redirects only; every other retry is ``fetch_url``'s (with our reasons and backoff).
_REDIRECTS_ONLY = urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=MAX_REDIRECTS)


class FetchError(Exception):
    """Getting the bytes failed; ``reason`` is a stable skip reason.

    ``transient`` failures are worth retrying, no sooner than ``retry_after`` seconds
    (the server's ``Retry-After``) when that is set.
    """

    def __init__(self, reason: str, detail: str, transient: bool = False, retry_after: float | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.transient = transient
        self.retry_after = retry_after


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


@functools.lru_cache(maxsize=1)
def _pool(pid: int) -> urllib3.PoolManager:
    """The connection pool of process ``pid`` (a forked worker must not share its parent's sockets)."""
    return urllib3.PoolManager(num_pools=_POOL_HOSTS, maxsize=_POOL_CONNECTIONS_PER_HOST, block=False)


def _request(url: str, config: FetchConfig) -> urllib3.BaseHTTPResponse:
    """Send the request and read the headers, following redirects; the body is left unread."""
    try:
        return _pool(os.getpid()).urlopen(
            "GET",
            url,
            headers={"User-Agent": config.user_agent, "Accept": "image/*,*/*;q=0.5"},
            timeout=config.timeout,
            retries=_REDIRECTS_ONLY,
            preload_content=False,
            decode_content=False,  # the bytes as served: hashed, size-checked and decoded as they are
        )
    except (HTTPError, OSError, ValueError) as err:
        raise _request_error(err, config) from None


def _request_error(err: Exception, config: FetchConfig) -> FetchError:
    """The ``FetchError`` for an exception raised before a response arrived."""
    cause = err.reason if isinstance(err, MaxRetryError) and err.reason is not None else err
    if isinstance(cause, ResponseError):
        return FetchError(HTTP_ERROR, f"more than {MAX_REDIRECTS} redirects")
    if isinstance(cause, NewConnectionError):  # a subclass of the timeout error, but a refused connection
        return FetchError(CONNECTION_ERROR, _without_repr(cause), transient=True)
    if isinstance(cause, (Urllib3Timeout, TimeoutError)):
        return FetchError(TIMEOUT, f"no response within {config.timeout} s")
    if isinstance(cause, LocationValueError):
        return FetchError(CONNECTION_ERROR, f"invalid URL: {cause}")
    return FetchError(CONNECTION_ERROR, f"{type(cause).__name__}: {_without_repr(cause)}", transient=True)


def _without_repr(err: Exception) -> str:
    """The message without the ``<...HTTPConnection object at 0x...>: `` prefix of urllib3 < 2.6 (not reproducible)."""
    return str(err).rsplit(">: ", 1)[-1]


def _status_error(response: urllib3.BaseHTTPResponse) -> FetchError:
    """The ``FetchError`` for a response that is not 2xx."""
    status = response.status
    reason = NOT_FOUND if status in (404, 410) else HTTP_ERROR
    retry_after = _retry_after(response.headers.get("Retry-After")) if status in RETRY_AFTER_STATUSES else None
    return FetchError(reason, f"HTTP {status}", transient=status == 429 or status >= 500, retry_after=retry_after)


def _retry_after(value: str | None) -> float | None:
    """Seconds asked for by a ``Retry-After`` header (delay seconds or an HTTP date); ``None`` if absent or invalid."""
    if value is None:
        return None
    try:
        return urllib3.Retry().parse_retry_after(value)
    except InvalidHeader:
        return None


def _fetch_once(url: str, config: FetchConfig, clock: Callable[[], float]) -> bytes:
    start = clock()
    response = _request(url, config)
    try:
        if not 200 <= response.status < 300:
            raise _status_error(response)
        return _read_body(response, config, start, clock)
    except FetchError:
        _discard(response)
        raise
    finally:
        response.release_conn()


def _discard(response: urllib3.BaseHTTPResponse) -> None:
    """Free the connection of a refused response: read a short rest (the connection stays alive), else close it."""
    remaining = response.length_remaining
    if remaining is not None and remaining <= _CHUNK:
        response.drain_conn()
    else:
        response.close()


def _read_body(response: urllib3.BaseHTTPResponse, config: FetchConfig, start: float, clock: Callable[[], float]) -> bytes:
    headers = response.headers
    if config.respect_robots and (directive := robots_forbid(headers.getlist("X-Robots-Tag"))):
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
    except Urllib3Timeout:
        raise FetchError(TIMEOUT, f"body not complete within {config.timeout} s") from None
    except ProtocolError as err:  # urllib3 checks the body's length against Content-Length
        if isinstance(err.__cause__, http.client.IncompleteRead):
            raise FetchError(TRUNCATED, f"got {size} of {expected} bytes", transient=True) from None
        raise FetchError(CONNECTION_ERROR, f"{type(err).__name__}: {err}", transient=True) from None
    except (HTTPError, OSError) as err:
        raise FetchError(CONNECTION_ERROR, f"{type(err).__name__}: {err}", transient=True) from None
    return b"".join(chunks)


def _retry_wait(config: FetchConfig, attempt: int, retry_after: float | None) -> float:
    """Seconds before retry ``attempt`` (0-based): the backoff, or a longer ``Retry-After``, at most ``MAX_WAIT``."""
    return min(max(config.backoff * 2**attempt, retry_after or 0.0), MAX_WAIT)


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
            wait = _retry_wait(config, attempt, err.retry_after)
        sleep(wait)
        attempt += 1
