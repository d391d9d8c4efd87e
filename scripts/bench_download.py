"""Client CPU per download: clipalign's ``Downloader`` (aiohttp on one event loop) against a
pool of blocking urllib3 threads (the usual design, and ours before), on the same files.

Both fetch the same JPEGs from a loopback HTTP server (``bench_prep.FileServer``, a child
process started afresh for each run) with the same concurrency, and are reported as CPU
milliseconds per request in this process (the client) and in the server. Runs alternate.

    python scripts/bench_download.py --n 3000 --concurrency 16 --repeats 2

Run nothing else on the machine meanwhile.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prep import FileServer, make_images  # noqa: E402

from data_prep.fetch import Downloader, FetchConfig  # noqa: E402


def _self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def with_downloader(urls: list[str], concurrency: int) -> int:
    """clipalign's way: the prep threads wait while one event loop downloads."""
    config = FetchConfig()
    with Downloader(concurrency) as downloader, ThreadPoolExecutor(concurrency) as pool:
        return sum(pool.map(lambda url: len(downloader.fetch(url, config)), urls))


def with_urllib3_threads(urls: list[str], concurrency: int) -> int:
    """The baseline: each thread sends its request and reads the body through a shared urllib3 pool."""
    import urllib3

    pool_manager = urllib3.PoolManager(maxsize=concurrency)

    def get(url: str) -> int:
        response = pool_manager.urlopen("GET", url, preload_content=False, decode_content=False, timeout=10.0)
        chunks = []
        while chunk := response.read(1 << 16):
            chunks.append(chunk)
        response.release_conn()
        return len(b"".join(chunks))

    with ThreadPoolExecutor(concurrency) as pool:
        return sum(pool.map(get, urls))


CLIENTS: dict[str, Callable[[list[str], int], int]] = {"downloader": with_downloader, "urllib3-threads": with_urllib3_threads}


def run_client(name: str, folder: Path, names: list[str], concurrency: int) -> dict[str, float]:
    with FileServer(folder) as server:
        urls = [f"{server.base}/{n}" for n in names]
        cpu, start = _self_cpu_s(), time.perf_counter()
        total = CLIENTS[name](urls, concurrency)
        seconds, cpu_s = time.perf_counter() - start, _self_cpu_s() - cpu
    n = len(urls)
    return {"client": name, "requests": n, "mean_kB": total / n / 1e3, "wall_ms": seconds / n * 1e3,
            "client_cpu_ms": cpu_s / n * 1e3, "server_cpu_ms": server.cpu_s / n * 1e3}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=3000, help="requests per run")
    p.add_argument("--concurrency", type=int, default=16, help="requests at once (prep's --threads)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_download_") as tmp:
        images = make_images(Path(tmp), args.n, 640, 480)
        names = [path.name for path in images]
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in CLIENTS}
        for _ in range(args.repeats):
            for name in CLIENTS:
                r = run_client(name, Path(tmp), names, args.concurrency)
                runs[name].append(r)
                print(f"{name:16s} {r['requests']} requests of {r['mean_kB']:.0f} kB: {r['wall_ms']:.2f} wall ms, "
                      f"client {r['client_cpu_ms']:.2f} CPU ms, server {r['server_cpu_ms']:.2f} CPU ms a request",
                      flush=True)
    medians = {name: statistics.median(r["client_cpu_ms"] for r in rs) for name, rs in runs.items()}
    print("median client CPU ms a request: " + ", ".join(f"{k} {v:.2f}" for k, v in medians.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs, "median_client_cpu_ms": medians},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
