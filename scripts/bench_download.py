"""What downloading costs a prep worker: clipalign's ``Downloader`` (libcurl through pycurl)
against two other designs, inside the real per-shard pipeline, on the same files.

Each client downloads the same JPEGs from a loopback HTTP server (``bench_prep.FileServer``,
a child process started afresh for each run) while the shard pipeline (``shard_job._outcomes``)
decodes, resizes and re-encodes them, as one prep worker does (``--threads`` fetch threads,
one encoder). The CPU time
of the worker's threads is read from ``/proc`` and reported per image, by role:

* ``download``: the fetch threads, plus the event-loop thread for ``aiohttp``;
* ``encode``: the decode/resize/encode thread; ``main``: the thread that hands out the work.

Clients:

* ``curl``: ``data_prep.fetch.Downloader``: each fetch thread drives its own curl handle; the
  transfer runs in C without the GIL.
* ``aiohttp``: one asyncio event loop in its own thread downloads (aiohttp, C HTTP parser);
  the fetch threads wait for its results.
* ``urllib3``: each fetch thread downloads through one shared urllib3 pool (pure Python over
  ``http.client``), the usual design.

    pip install -e '.[bench]'        # aiohttp and urllib3, for the two baselines
    python scripts/bench_download.py --n 2000 --threads 16 --repeats 2

Linux only (``/proc``). Run nothing else on the machine meanwhile.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
from bench_prep import FileServer, make_images  # noqa: E402

from data_prep import shard_job  # noqa: E402
from data_prep.fetch import Downloader, FetchConfig  # noqa: E402
from data_prep.manifest import Record  # noqa: E402
from clipalign.memory import keep_freed_memory  # noqa: E402
from data_prep.sample import SampleConfig  # noqa: E402


class AiohttpClient:
    """One asyncio event loop thread downloads with aiohttp; callers wait on its futures."""

    def __init__(self, limit: int) -> None:
        import aiohttp

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="loop", daemon=True)
        self._thread.start()

        async def open_session() -> Any:
            return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit), auto_decompress=False)

        self._session = asyncio.run_coroutine_threadsafe(open_session(), self._loop).result()

    async def _get(self, url: str, timeout: float) -> bytes:
        import aiohttp

        async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            response.raise_for_status()
            return await response.read()

    def fetch(self, url: str, config: FetchConfig = FetchConfig()) -> bytes:
        return asyncio.run_coroutine_threadsafe(self._get(url, config.timeout), self._loop).result()

    def __enter__(self) -> AiohttpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._session.close(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()


class Urllib3Client:
    """Each calling thread downloads through one shared urllib3 connection pool."""

    def __init__(self, limit: int) -> None:
        import urllib3

        self._pool = urllib3.PoolManager(maxsize=limit)

    def fetch(self, url: str, config: FetchConfig = FetchConfig()) -> bytes:
        response = self._pool.urlopen("GET", url, preload_content=False, decode_content=False, timeout=config.timeout)
        try:
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}")
            return response.read()
        finally:
            response.release_conn()

    def __enter__(self) -> Urllib3Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.clear()


CLIENTS: dict[str, Callable[[int], Any]] = {
    "curl": lambda limit: Downloader(),
    "aiohttp": AiohttpClient,
    "urllib3": Urllib3Client,
}


def thread_cpu_s() -> dict[int, tuple[str, float]]:
    """CPU seconds of each live thread of this process: native id -> (role, seconds)."""
    tick = os.sysconf("SC_CLK_TCK")
    names = {t.native_id: t.name for t in threading.enumerate()}
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        name = names.get(int(tid), "other")
        role = "main" if int(tid) == os.getpid() else "encode" if name.startswith("encode") else \
            "download" if name.startswith(("fetch", "loop")) else "other"
        out[int(tid)] = (role, (int(fields[11]) + int(fields[12])) / tick)
    return out


def run_client(name: str, records: list[Record], threads: int) -> dict[str, float]:
    """Build one shard of ``records`` with ``name`` as the downloader; CPU ms per image by role."""
    shard_job.Downloader = lambda: CLIENTS[name](threads)  # what _outcomes opens for URL records
    config = SampleConfig(image_size=256)
    before: dict[int, tuple[str, float]] = {}
    after: dict[int, tuple[str, float]] = {}
    for i, outcome in enumerate(shard_job._outcomes(records, config, threads, 1)):
        assert outcome.sample is not None, outcome.detail
        if i == 0:  # once every thread has started
            before = thread_cpu_s()
        if i == len(records) - 1:  # before the pools end and their threads vanish
            after = thread_cpu_s()
    per_role: dict[str, float] = {}
    for tid, (role, seconds) in after.items():
        per_role[role] = per_role.get(role, 0.0) + seconds - before.get(tid, (role, 0.0))[1]
    n = len(records) - 1
    return {role: seconds / n * 1000 for role, seconds in sorted(per_role.items())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="images per run")
    p.add_argument("--threads", type=int, default=16, help="fetch threads (prep's --threads)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each client, alternating")
    p.add_argument("--clients", default=",".join(CLIENTS), help="comma list of " + ", ".join(CLIENTS))
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    keep_freed_memory()  # as prep's workers
    names = args.clients.split(",")
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="bench_download_") as tmp:
        images = make_images(Path(tmp), args.n, 640, 480)
        for _ in range(args.repeats):
            for name in names:
                with FileServer(Path(tmp)) as server:
                    records = [Record(index=i, source=url, path=None, caption="a photo", url=url)
                               for i, url in enumerate(f"{server.base}/{p.name}" for p in images)]
                    r = run_client(name, records, args.threads)
                r["server"] = server.cpu_s / len(records) * 1000
                r["worker"] = sum(v for k, v in r.items() if k in ("download", "encode", "main", "other"))
                runs[name].append(r)
                print(f"{name:8s} CPU ms an image: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()), flush=True)
    medians = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    for name, m in medians.items():
        print(f"median {name:8s} download {m['download']:.2f}, worker {m['worker']:.2f}, server {m['server']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs, "medians": medians}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
