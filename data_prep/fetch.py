"""Get an image's bytes: from a local file, or over HTTP(S) with retries and limits.

Downloads run on an asyncio event loop with aiohttp (``Downloader``): one loop thread per
worker process holds its connections (kept alive and reused per host) and overlaps
``limit`` requests, parsing them with aiohttp's C HTTP parser. Against a pool of blocking
threads this costs about half the client CPU per image (see BENCHMARKS.md).

Every failure raises ``FetchError`` with a stable ``reason`` (counted in ``stats.json``)
and a detail. Transient failures (connection errors, truncated bodies, HTTP 429 and 5xx)
are retried with exponential backoff, or after the server's ``Retry-After`` on 429 and 503
when that is longer; the rest fail at once.
"""
from __future__ import annotations

import asyncio
import email.utils
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Awaitable, Callable, Coroutine, TypeVar

import aiohttp

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]

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


def retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds asked for by a ``Retry-After`` header (delay seconds or an HTTP date); ``None`` if absent or invalid."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())


def _retry_wait(config: FetchConfig, attempt: int, after: float | None) -> float:
    """Seconds before retry ``attempt`` (0-based): the backoff, or a longer ``Retry-After``, at most ``MAX_WAIT``."""
    return min(max(config.backoff * 2**attempt, after or 0.0), MAX_WAIT)


def _request_error(err: Exception, config: FetchConfig) -> FetchError:
    """The ``FetchError`` for an exception raised while requesting or reading a response."""
    if isinstance(err, aiohttp.TooManyRedirects):
        return FetchError(HTTP_ERROR, f"more than {MAX_REDIRECTS} redirects")
    if isinstance(err, (TimeoutError, asyncio.TimeoutError)):  # aiohttp's own derive from the first
        return FetchError(TIMEOUT, f"not complete within {config.timeout} s")
    if isinstance(err, (aiohttp.InvalidURL, ValueError)):
        return FetchError(CONNECTION_ERROR, f"invalid URL: {err}")
    if isinstance(err, aiohttp.ClientPayloadError):  # the body ended before its Content-Length (or chunked end)
        return FetchError(TRUNCATED, str(err), transient=True)
    return FetchError(CONNECTION_ERROR, f"{type(err).__name__}: {err}", transient=True)


def _status_error(response: aiohttp.ClientResponse) -> FetchError:
    """The ``FetchError`` for a response that is not 2xx."""
    status = response.status
    reason = NOT_FOUND if status in (404, 410) else HTTP_ERROR
    after = retry_after(response.headers.get("Retry-After")) if status in RETRY_AFTER_STATUSES else None
    return FetchError(reason, f"HTTP {status}", transient=status == 429 or status >= 500, retry_after=after)


def _refusal(response: aiohttp.ClientResponse, config: FetchConfig) -> FetchError | None:
    """Why a response's body is not wanted, judged from its status and headers (``None``: read it)."""
    if not 200 <= response.status < 300:
        return _status_error(response)
    headers = response.headers
    if config.respect_robots and (directive := robots_forbid(headers.getall("X-Robots-Tag", []))):
        return FetchError(ROBOTS_NOAI, f"X-Robots-Tag: {directive}")
    ctype = response.content_type  # "application/octet-stream" when the header is absent
    if config.check_content_type and not (ctype.startswith("image/") or ctype == "application/octet-stream"):
        return FetchError(NOT_AN_IMAGE, f"Content-Type: {ctype}")
    if response.content_length is not None and response.content_length > config.max_bytes:
        return FetchError(TOO_LARGE, f"Content-Length {response.content_length} > {config.max_bytes}")
    return None


async def _read_body(response: aiohttp.ClientResponse, max_bytes: int) -> bytes:
    """The body, refused once it grows past ``max_bytes`` (a missing or lying Content-Length)."""
    if response.content_length is not None:  # checked against max_bytes; aiohttp reads no further
        return await response.read()
    chunks: list[bytes] = []
    size = 0
    while chunk := await response.content.read(_CHUNK):
        chunks.append(chunk)
        size += len(chunk)
        if size > max_bytes:
            raise FetchError(TOO_LARGE, f"body > {max_bytes} bytes")
    return b"".join(chunks)


async def _discard(response: aiohttp.ClientResponse) -> None:
    """Free the connection of a refused response: read a short rest (the connection stays alive), else close it."""
    length = response.content_length
    if length is not None and length <= _CHUNK:
        try:
            await response.read()
            return
        except (aiohttp.ClientError, TimeoutError):
            pass
    response.close()


class Downloader:
    """Downloads on an asyncio event loop in a background thread, ``limit`` requests at once.

    The loop owns one aiohttp session: its connections are kept alive and reused per host.
    Any thread may call ``submit`` or ``fetch``; use it as a context manager (or ``close``
    it) so that the connections and the thread end. A forked process makes its own.
    """

    def __init__(self, limit: int = 16) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="downloader", daemon=True)
        self._thread.start()
        self._limit = limit
        self._session, self._slots = self.run(self._open()).result()

    async def _open(self) -> tuple[aiohttp.ClientSession, asyncio.Semaphore]:
        # The semaphore bounds requests in flight (not retries waiting); the connector keeps
        # at most ``limit`` idle connections per host for the next requests.
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=self._limit, ttl_dns_cache=300)
        session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,  # the bytes as served: hashed, size-checked and decoded as they are
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,  # no proxies from the environment
        )
        return session, asyncio.Semaphore(self._limit)

    def run(self, coro: Coroutine[object, object, T]) -> Future[T]:
        """Schedule ``coro`` on the loop; its result arrives in the returned future."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def get(self, url: str, config: FetchConfig, *, sleep: Sleep = asyncio.sleep) -> bytes:
        """Download ``url`` (following redirects), retrying transient failures; call on the loop (see ``run``).

        Raises:
            FetchError: with the reason of the last attempt.
        """
        attempt = 0
        while True:
            try:
                async with self._slots:
                    return await self._get_once(url, config)
            except FetchError as err:
                if not err.transient or attempt >= config.retries:
                    raise
                wait = _retry_wait(config, attempt, err.retry_after)
            await sleep(wait)
            attempt += 1

    async def _get_once(self, url: str, config: FetchConfig) -> bytes:
        headers = {"User-Agent": config.user_agent, "Accept": "image/*,*/*;q=0.5", "Accept-Encoding": "identity"}
        try:
            async with self._session.get(
                url, headers=headers, timeout=aiohttp.ClientTimeout(total=config.timeout),
                max_redirects=MAX_REDIRECTS,
            ) as response:
                if refusal := _refusal(response, config):
                    await _discard(response)
                    raise refusal
                try:
                    return await _read_body(response, config.max_bytes)
                except FetchError:
                    response.close()
                    raise
        except (aiohttp.ClientError, OSError, ValueError, asyncio.TimeoutError) as err:
            raise _request_error(err, config) from None

    def fetch(self, url: str, config: FetchConfig = FetchConfig(), *, sleep: Sleep = asyncio.sleep) -> bytes:
        """``get`` from a thread outside the loop: wait for the bytes (or the ``FetchError``)."""
        return self.run(self.get(url, config, sleep=sleep)).result()

    def close(self) -> None:
        """Close the connections and stop the loop thread."""
        if self._loop.is_closed():
            return
        self.run(self._session.close()).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> Downloader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fetch_url(url: str, config: FetchConfig = FetchConfig(), *, sleep: Sleep = asyncio.sleep) -> bytes:
    """Download one URL with a downloader of its own (for many, keep one ``Downloader``).

    Raises:
        FetchError: with the reason of the last attempt.
    """
    with Downloader(limit=1) as downloader:
        return downloader.fetch(url, config, sleep=sleep)
