"""Get an image's bytes: from a local file, or over HTTP(S) with retries and limits.

Downloads run in libcurl (pycurl): each thread that calls ``Downloader.fetch`` drives its
own curl handle, which keeps its connections alive and reuses them per host, and the whole
transfer (connect, send, parse, receive) runs in C without the GIL. Inside a prep worker
that costs ~0.6 CPU ms an image, against ~1.3 for threads on urllib3 and ~1.6 for aiohttp on
an event loop (``scripts/bench_download.py``, BENCHMARKS.md).

Every failure raises ``FetchError`` with a stable ``reason`` (counted in ``stats.json``)
and a detail. Transient failures (connection errors, truncated bodies, HTTP 429 and 5xx)
are retried with exponential backoff, or after the server's ``Retry-After`` on 429 and 503
when that is longer; the rest fail at once.
"""
from __future__ import annotations

import email.utils
import os
import re
import stat
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import certifi
import pycurl

from clipalign.formats.skips import (  # noqa: F401  (the download reasons, named where they are met)
    CONNECTION_ERROR,
    HTTP_ERROR,
    MISSING_IMAGE,
    NOT_A_FILE,
    NOT_AN_IMAGE,
    NOT_FOUND,
    ROBOTS_NOAI,
    TIMEOUT,
    TOO_LARGE,
    TRUNCATED,
    UNREADABLE_IMAGE,
)

DEFAULT_USER_AGENT = "clipalign-prep/1.0 (image-text dataset builder)"
# X-Robots-Tag directives asking not to use the content for AI training (as img2dataset honours).
NOAI_DIRECTIVES: frozenset[str] = frozenset({"noai", "noimageai"})
RETRY_AFTER_STATUSES: frozenset[int] = frozenset({429, 503})
MAX_WAIT = 30.0  # seconds: the longest wait before a retry, whatever the backoff or Retry-After say
MAX_REDIRECTS = 10  # as urllib and browsers
_DRAIN_LIMIT = 1 << 16  # bytes: a refused body up to this long is read, so its connection stays alive


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

    The file is opened without blocking and checked on its open descriptor, so a FIFO never
    hangs the run and a file swapped after a check is still caught.

    Raises:
        FetchError: ``missing_image``, ``not_a_file`` (a directory, FIFO, socket or device),
            ``unreadable_image`` or ``too_large``.
    """
    if path is None:
        raise FetchError(MISSING_IMAGE, "no image path")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise FetchError(MISSING_IMAGE, f"no such file: {path}") from None
    except OSError as err:
        raise FetchError(UNREADABLE_IMAGE, f"{type(err).__name__}: {err}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise FetchError(NOT_A_FILE, f"{path} is a {_file_kind(info.st_mode)}, not a regular file")
    with os.fdopen(fd, "rb") as f:
        if max_bytes is not None and info.st_size > max_bytes:
            raise FetchError(TOO_LARGE, f"{info.st_size} bytes > {max_bytes}")
        try:
            return f.read()
        except OSError as err:
            raise FetchError(UNREADABLE_IMAGE, f"{type(err).__name__}: {err}") from None


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
             (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"))
    return next((name for test, name in kinds if test(mode)), "special file")


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


# The reasons a later attempt may not meet: the network, a slow or busy server. Every other
# reason (404, 403, robots, not an image, too large, undecodable, ...) is the answer itself.
RETRYABLE_REASONS: frozenset[str] = frozenset({CONNECTION_ERROR, TIMEOUT, TRUNCATED, HTTP_ERROR})
_STATUS_DETAIL = re.compile(r"HTTP (\d{3})")


def _status_detail(status: int) -> str:
    """An ``http_error``'s detail: the status, as ``is_retryable`` reads it back from ``errors.jsonl``."""
    return f"HTTP {status}"


def _transient_status(status: int) -> bool:
    return status == 429 or status >= 500


def is_retryable(reason: str | None, detail: str | None) -> bool:
    """Whether a row skipped for ``reason`` (with ``detail``) is worth fetching again: a connection
    error, a timeout, a truncated body, or HTTP 429 or 5xx (not another status, nor too many redirects)."""
    if reason not in RETRYABLE_REASONS:
        return False
    if reason != HTTP_ERROR:
        return True
    status = _STATUS_DETAIL.fullmatch(detail or "")
    return status is not None and _transient_status(int(status.group(1)))


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


# libcurl's errors with a reason of their own, or not worth a retry; the rest are transient connection errors.
_CURL_REASONS: dict[int, tuple[str, bool]] = {
    pycurl.E_OPERATION_TIMEDOUT: (TIMEOUT, False),
    pycurl.E_TOO_MANY_REDIRECTS: (HTTP_ERROR, False),
    pycurl.E_PARTIAL_FILE: (TRUNCATED, True),  # the body ended before its Content-Length
    pycurl.E_URL_MALFORMAT: (CONNECTION_ERROR, False),
    pycurl.E_UNSUPPORTED_PROTOCOL: (CONNECTION_ERROR, False),  # not http(s), also after a redirect
    pycurl.E_PEER_FAILED_VERIFICATION: (CONNECTION_ERROR, False),
}


def _curl_error(code: int, message: str, config: FetchConfig) -> FetchError:
    """The ``FetchError`` for a libcurl error code."""
    reason, transient = _CURL_REASONS.get(code, (CONNECTION_ERROR, True))
    if reason == TIMEOUT:
        message = f"not complete within {config.timeout} s"
    elif reason == HTTP_ERROR:
        message = f"more than {MAX_REDIRECTS} redirects"
    else:  # without curl's timings ("Failed to connect ... after 0 ms: ..."), so that details are reproducible
        message = f"curl error {code}: {re.sub(r' after [0-9]+ ms', '', message)}"
    return FetchError(reason, message, transient=transient)


class _Response:
    """Collects one transfer: the last response's status and headers (redirects are followed) and its body.

    ``write`` judges the response from its headers when the body starts: a refused one is
    read on only when short (its connection then stays alive), else the transfer is aborted.
    """

    def __init__(self, config: FetchConfig) -> None:
        self.config = config
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.chunks: list[bytes] = []
        self.size = 0
        self.judged = False
        self.refusal: FetchError | None = None

    def header(self, line: bytes) -> None:
        text = line.decode("latin-1").strip()
        if text.startswith("HTTP/"):  # a new response (after a redirect or a 100 Continue)
            self.status = int(text.split()[1])
            self.headers = []
        elif ":" in text:
            name, value = text.split(":", 1)
            self.headers.append((name.strip().lower(), value.strip()))

    def get(self, name: str) -> str | None:
        return next((value for key, value in self.headers if key == name), None)

    def content_length(self) -> int | None:
        value = self.get("content-length")
        return int(value) if value is not None and value.isdigit() else None

    def judge(self) -> FetchError | None:
        """Why the body is not wanted, from the status and headers (``None``: keep it)."""
        self.judged = True
        config = self.config
        if not 200 <= self.status < 300:
            after = retry_after(self.get("retry-after")) if self.status in RETRY_AFTER_STATUSES else None
            reason = NOT_FOUND if self.status in (404, 410) else HTTP_ERROR
            return FetchError(reason, _status_detail(self.status), transient=_transient_status(self.status),
                              retry_after=after)
        robots = [value for key, value in self.headers if key == "x-robots-tag"]
        if config.respect_robots and (directive := robots_forbid(robots)):
            return FetchError(ROBOTS_NOAI, f"X-Robots-Tag: {directive}")
        ctype = (self.get("content-type") or "").split(";")[0].strip().lower()
        if config.check_content_type and ctype and not (ctype.startswith("image/") or ctype == "application/octet-stream"):
            return FetchError(NOT_AN_IMAGE, f"Content-Type: {ctype}")
        length = self.content_length()
        if length is not None and length > config.max_bytes:
            return FetchError(TOO_LARGE, f"Content-Length {length} > {config.max_bytes}")
        return None

    def write(self, chunk: bytes) -> int | None:
        """libcurl's write callback: ``None`` takes the chunk, ``0`` aborts the transfer."""
        if not self.judged:
            self.refusal = self.judge()
            if self.refusal is not None:
                length = self.content_length()
                return None if length is not None and length <= _DRAIN_LIMIT else 0  # drain a short body, else abort
        if self.refusal is not None:
            return None
        self.size += len(chunk)
        if self.size > self.config.max_bytes:
            self.refusal = FetchError(TOO_LARGE, f"body > {self.config.max_bytes} bytes")
            return 0
        self.chunks.append(chunk)
        return None


def _new_handle() -> pycurl.Curl:
    """A curl handle with the settings every download shares."""
    handle = pycurl.Curl()
    handle.setopt(pycurl.FOLLOWLOCATION, 1)
    handle.setopt(pycurl.MAXREDIRS, MAX_REDIRECTS)
    handle.setopt(pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
    handle.setopt(pycurl.REDIR_PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)  # never file:// by a redirect
    handle.setopt(pycurl.NOSIGNAL, 1)  # timeouts without signals: safe in threads
    handle.setopt(pycurl.PROXY, "")  # no proxies from the environment
    handle.setopt(pycurl.CAINFO, certifi.where())
    handle.setopt(pycurl.HTTPHEADER, ["Accept: image/*,*/*;q=0.5"])  # and no Accept-Encoding: bytes as served
    handle.setopt(pycurl.BUFFERSIZE, 1 << 19)  # fewer, larger chunks into Python
    return handle


class Downloader:
    """Downloads with libcurl; every thread that calls ``fetch`` gets a curl handle of its own.

    A handle keeps its connections alive for the thread's next requests to the same host.
    Use it as a context manager (or ``close`` it) to close them. A forked process makes its own.
    """

    def __init__(self) -> None:
        self._local = threading.local()
        self._handles: list[pycurl.Curl] = []
        self._lock = threading.Lock()

    def _handle(self) -> pycurl.Curl:
        handle = getattr(self._local, "handle", None)
        if handle is None:
            handle = self._local.handle = _new_handle()
            with self._lock:
                self._handles.append(handle)
        return handle

    def fetch(self, url: str, config: FetchConfig = FetchConfig(), *,
              sleep: Callable[[float], None] = time.sleep) -> bytes:
        """Download ``url`` (following redirects), retrying transient failures.

        Raises:
            FetchError: with the reason of the last attempt.
        """
        attempt = 0
        while True:
            try:
                return self._fetch_once(url, config)
            except FetchError as err:
                if not err.transient or attempt >= config.retries:
                    raise
                wait = _retry_wait(config, attempt, err.retry_after)
            sleep(wait)
            attempt += 1

    def _fetch_once(self, url: str, config: FetchConfig) -> bytes:
        handle = self._handle()
        response = _Response(config)
        handle.setopt(pycurl.URL, url)
        handle.setopt(pycurl.TIMEOUT_MS, max(1, round(config.timeout * 1000)))
        handle.setopt(pycurl.USERAGENT, config.user_agent)
        handle.setopt(pycurl.HEADERFUNCTION, response.header)
        handle.setopt(pycurl.WRITEFUNCTION, response.write)
        try:
            handle.perform()  # without the GIL, but for the callbacks
        except pycurl.error as err:
            if response.refusal is not None:  # we aborted it
                raise response.refusal from None
            raise _curl_error(err.args[0], err.args[1], config) from None
        refusal = response.refusal or (None if response.judged else response.judge())  # an empty body: no write
        if refusal is not None:
            raise refusal
        return b"".join(response.chunks)

    def close(self) -> None:
        """Close every thread's handle and its connections."""
        with self._lock:
            for handle in self._handles:
                handle.close()
            self._handles.clear()
        self._local = threading.local()

    def __enter__(self) -> Downloader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fetch_url(url: str, config: FetchConfig = FetchConfig(), *, sleep: Callable[[float], None] = time.sleep) -> bytes:
    """Download one URL with a handle of its own (for many, keep one ``Downloader``).

    Raises:
        FetchError: with the reason of the last attempt.
    """
    with Downloader() as downloader:
        return downloader.fetch(url, config, sleep=sleep)
