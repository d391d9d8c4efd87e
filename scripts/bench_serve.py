"""Benchmark ``clipalign serve`` under many concurrent clients: latency percentiles and throughput.

Builds a toy index (an untrained ``ca-nano``, so no data or download is needed), starts the
server on 127.0.0.1 in a process of its own, then ``--clients`` threads (``http.client``,
one kept-alive connection each, all connecting at once) each send ``--requests`` text
searches. Reports p50/p90/p99/max latency (a client's first request includes its connect),
requests/s, and requests slower than 1 s (a dropped SYN costs its client a 1 s retransmission).

``--server legacy`` runs the server as it was before the fix (listen backlog 5, socketserver's
default; each text query encoded alone; no idle timeout), ``backlog`` with only the backlog
fixed, ``fixed`` as it is; ``both`` (the default) runs legacy and fixed side by side, ``all`` the three.

    .venv/bin/python scripts/bench_serve.py                        # 50 clients x 40 requests, both servers
    .venv/bin/python scripts/bench_serve.py --clients 8 --requests 5 --images 64 --server fixed   # a smoke run
"""
from __future__ import annotations

import argparse
import http.client
import json
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SERVER = """
import json, sys
from retrieval.engine import open_engine
from retrieval.server import make_server
index, options = sys.argv[1], json.loads(sys.argv[2])
engine = open_engine(index, eager=True, **{k: options.pop(k) for k in ("text_batch",) if k in options})
server = make_server(engine, "127.0.0.1", 0, quiet=True, **options)
print(server.server_address[1], flush=True)
server.serve_forever()
"""
# name -> make_server / open_engine options; what is not given is the default
SERVERS = {"legacy": {"backlog": 5, "idle_timeout_s": None, "text_batch": 1},
           "backlog": {"idle_timeout_s": None, "text_batch": 1},
           "fixed": {}}
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("square", "circle", "star", "triangle")


def machine() -> dict[str, object]:
    from clipalign.machine import describe

    return describe()


def build_index(root: Path, n_images: int) -> Path:
    """``n_images`` coloured squares with captions → a ca-nano (random weights) index folder."""
    import numpy as np
    import torch
    from PIL import Image

    from clipalign.checkpoint import save_checkpoint
    from clipalign.factory import create_model_and_transforms
    from retrieval.build import index_images

    torch.manual_seed(0)
    model, _, _ = create_model_and_transforms("ca-nano")
    ckpt = save_checkpoint(root / "ca-nano.pt", {"model_name": "ca-nano", "step": 0, "model": model.state_dict()})
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n_images):
        colour = COLOURS[i % len(COLOURS)]
        rgb = tuple(int(c) for c in rng.integers(0, 256, 3))
        Image.new("RGB", (32, 32), rgb).save(images / f"{i:05d}.png")
        (images / f"{i:05d}.txt").write_text(f"a {colour} {SHAPES[i % len(SHAPES)]}")
    index_images(ckpt, images, root / "index", batch_size=64, kind="flat")
    return root / "index"


def start_server(index: Path, options: dict[str, object]) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(index), json.dumps(options)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    if not select.select([proc.stdout], [], [], 120)[0]:
        proc.kill()
        raise RuntimeError("the server did not start within 120 s")
    return proc, int(proc.stdout.readline())


def run_clients(port: int, clients: int, requests: int, k: int) -> dict[str, object]:
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)  # connects on its first request
        mine, failed = [], []
        start.wait()
        try:
            for r in range(requests):
                text = f"a {COLOURS[(c + r) % len(COLOURS)]} {SHAPES[r % len(SHAPES)]}"
                t0 = time.perf_counter()
                try:
                    conn.request("GET", f"/search?text={quote(text)}&k={k}")
                    resp = conn.getresponse()
                    body = resp.read()
                    if resp.status != 200 or not json.loads(body)["results"]:
                        failed.append(f"HTTP {resp.status}")
                except (OSError, http.client.HTTPException) as err:
                    failed.append(type(err).__name__)
                    conn.close()
                mine.append(time.perf_counter() - t0)
        finally:
            conn.close()
            with lock:
                latencies.extend(mine)
                errors.extend(failed)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = sorted(x * 1000 for x in latencies)

    def pct(p: float) -> float:
        return round(ms[min(len(ms) - 1, int(p / 100 * len(ms)))], 1)

    return {"requests": len(ms), "errors": len(errors), "req_per_s": round(len(ms) / wall, 1),
            "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99), "max_ms": round(ms[-1], 1),
            "mean_ms": round(statistics.fmean(ms), 1), "over_1s": sum(x > 1000 for x in ms)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--requests", type=int, default=40, help="requests per client")
    p.add_argument("--images", type=int, default=600, help="images in the toy index")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--server", choices=["both", "all", *SERVERS], default="both")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)

    info = machine()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), file=sys.stderr)
    results: dict[str, object] = {"machine": info, "clients": args.clients, "requests_per_client": args.requests,
                                  "images": args.images, "k": args.k}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        index = build_index(Path(tmp), args.images)
        names = {"both": ["legacy", "fixed"], "all": list(SERVERS)}.get(args.server, [args.server])
        for name in names:
            proc, port = start_server(index, SERVERS[name])
            try:
                run_clients(port, min(4, args.clients), 3, args.k)  # warm: the first queries build caches
                results[name] = run_clients(port, args.clients, args.requests, args.k)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            print(f"{name}: " + json.dumps(results[name]), file=sys.stderr)

    fields = ["requests", "errors", "req_per_s", "p50_ms", "p90_ms", "p99_ms", "max_ms", "over_1s"]
    print(f"\n{args.clients} clients x {args.requests} requests, k={args.k}, {args.images} images, "
          f"{info['usable_cores']} cores ({info['cpu']}), torch {info['torch']}, load {info['load_avg_1m']}")
    print("| server | " + " | ".join(fields) + " |")
    print("|---|" + "---:|" * len(fields))
    for n in names:
        print(f"| {n} | " + " | ".join(str(results[n][f]) for f in fields) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
