"""Benchmark ``clipalign prep`` against img2dataset on the same inputs, side by side.

Two inputs, each given to both tools as a CSV of ``url,caption`` rows:

* ``local``: ``file://`` URLs of JPEGs on disk;
* ``url``:   ``http://127.0.0.1:PORT/...`` URLs served by a loopback HTTP server: a child
  process started afresh for each tool's run, speaking HTTP/1.1 with keep-alive and
  TCP_NODELAY as real web servers do (a client may keep its connections or not).

Both tools get the same resize settings (``--image-size``, center_crop, jpg, quality 95),
the same worker processes and threads, and write WebDataset shards. Each run is timed
as a whole command (start-up included) and reported as written images per second, and
as CPU milliseconds per image (the tool's processes plus, for URLs, the server's: on a
busy machine this moves much less than the wall time). With ``--repeats R`` the tools
run R times each, alternating, and the medians are compared.

    python scripts/bench_prep.py --n 20000 --workers 2          # the full measurement
    python scripts/bench_prep.py --quick                        # a few hundred images, to check it works

img2dataset runs from its own virtual environment (its pins clash with ours):

    python3 -m venv .venv-bench && .venv-bench/bin/pip install img2dataset

Run nothing else on the machine meanwhile.
"""
from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DISTINCT_IMAGES = 64  # source files are copies of these (decoding cost is what matters)


def make_images(folder: Path, n: int, width: int, height: int, seed: int = 0) -> list[Path]:
    """``n`` JPEG files of photo-like content (smooth gradients, shapes, noise)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    blobs = []
    for _ in range(min(n, DISTINCT_IMAGES)):
        base = np.stack([np.sin(xx / rng.uniform(20, 90) + rng.uniform(0, 6)) * np.cos(yy / rng.uniform(20, 90))
                         for _ in range(3)], axis=-1)
        img = (base * 100 + 128 + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
        path = folder / f"src{len(blobs)}.jpg"
        Image.fromarray(img).save(path, quality=90)
        blobs.append(path.read_bytes())
    paths = []
    for i in range(n):
        path = folder / f"{i:07d}.jpg"
        path.write_bytes(blobs[i % len(blobs)])
        paths.append(path)
    return paths


def write_manifest(path: Path, urls: list[str]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["url", "caption"])
        w.writerows([u, f"a synthetic photo number {i}"] for i, u in enumerate(urls))
    return path


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # the listen backlog: many threads connect at once


class _QuietHandler(SimpleHTTPRequestHandler):
    # As a real web server: HTTP/1.1 keep-alive (for clients that keep connections) and
    # TCP_NODELAY (without it a kept-alive response's body waits ~40 ms for a delayed ACK).
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args: object) -> None:
        pass


def _serve(folder: str, port_queue: multiprocessing.Queue) -> None:
    handler = partial(_QuietHandler, directory=folder)
    httpd = _Server(("127.0.0.1", 0), handler)
    port_queue.put(httpd.server_address[1])
    httpd.serve_forever()


def _children_cpu_s() -> float:
    """User + system CPU seconds of this process's finished (waited-for) descendants."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class FileServer:
    """Serve ``folder`` on 127.0.0.1 from a child process; ``cpu_s`` is its CPU time once stopped.

    It shares the machine's cores with the tool it serves, so its cost is reported with the tool's.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.cpu_s = 0.0

    def __enter__(self) -> FileServer:
        queue: multiprocessing.Queue = multiprocessing.Queue()
        self.process = multiprocessing.Process(target=_serve, args=(str(self.folder), queue), daemon=True)
        self.process.start()
        self.base = f"http://127.0.0.1:{queue.get(timeout=30)}"
        return self

    def __exit__(self, *exc: object) -> None:
        before = _children_cpu_s()
        self.process.terminate()
        self.process.join()
        self.cpu_s = _children_cpu_s() - before


def run_clipalign(manifest: Path, out: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "clipalign", "prep", str(manifest), "--out", str(out), "--image-col", "url",
           "--image-size", str(args.image_size), "--resize-mode", "center_crop", "--format", "jpg", "--quality", "95",
           "--workers", str(args.workers), "--threads", str(args.threads), "--shard-size", str(args.shard_size),
           "--overwrite"]
    timing = _timed(cmd, cwd=ROOT)
    stats = json.loads((out / "stats.json").read_text())
    return {"written": stats["written"], **timing, "command": " ".join(cmd)}


def run_img2dataset(manifest: Path, out: Path, args: argparse.Namespace) -> dict:
    exe = Path(args.img2dataset_python).parent / "img2dataset"
    cmd = [str(exe), "--url_list", str(manifest), "--input_format", "csv", "--url_col", "url", "--caption_col",
           "caption", "--output_format", "webdataset", "--output_folder", str(out), "--processes_count",
           str(args.workers), "--thread_count", str(args.threads), "--image_size", str(args.image_size),
           "--resize_mode", "center_crop", "--encode_format", "jpg", "--encode_quality", "95",
           "--number_sample_per_shard", str(args.shard_size), "--distributor", "multiprocessing",
           "--enable_wandb", "False"]
    if out.exists():
        shutil.rmtree(out)
    timing = _timed(cmd, cwd=out.parent)
    written = sum(json.loads(p.read_text())["successes"] for p in out.glob("*_stats.json"))
    return {"written": written, **timing, "command": " ".join(cmd)}


def _timed(cmd: list[str], cwd: Path) -> dict[str, float]:
    """Run ``cmd``: its wall time (``seconds``) and the CPU time of all its processes (``cpu_s``)."""
    cpu = _children_cpu_s()
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return {"seconds": seconds, "cpu_s": _children_cpu_s() - cpu}


def run_tool(run: Callable[[Path, Path, argparse.Namespace], dict], mode: str, images: list[Path], out: Path,
             args: argparse.Namespace) -> dict:
    """Run one tool on one input kind; for ``url`` a fresh server serves the images during this run only."""
    if mode == "local":
        r = run(write_manifest(out.with_suffix(".csv"), [p.resolve().as_uri() for p in images]), out, args)
    else:
        with FileServer(images[0].parent) as server:
            r = run(write_manifest(out.with_suffix(".csv"), [f"{server.base}/{p.name}" for p in images]), out, args)
        r["server_cpu_s"] = server.cpu_s
    per_image = 1000 / max(r["written"], 1)
    r["images_per_s"] = r["written"] / r["seconds"]
    r["cpu_ms_per_image"] = (r["cpu_s"] + r.get("server_cpu_s", 0.0)) * per_image
    r["server_cpu_ms_per_image"] = r.get("server_cpu_s", 0.0) * per_image
    return r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20_000, help="images per input kind")
    p.add_argument("--quick", action="store_true", help="300 images: check that everything runs")
    p.add_argument("--src-size", default="640x480", help="source image WxH")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=16, help="threads per worker, for both tools")
    p.add_argument("--shard-size", type=int, default=10_000)
    p.add_argument("--modes", default="local,url", help="comma list of local, url")
    p.add_argument("--repeats", type=int, default=1, help="runs of each tool per input kind, alternating; medians reported")
    p.add_argument("--img2dataset-python", default=str(ROOT / ".venv-bench/bin/python"))
    p.add_argument("--skip-img2dataset", action="store_true")
    p.add_argument("--work-dir", default=None, help="folder for inputs and outputs (default: a temporary one)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.shard_size = 300, 100
    width, height = (int(v) for v in args.src_size.split("x"))
    if not args.skip_img2dataset and not (Path(args.img2dataset_python).parent / "img2dataset").exists():
        p.error(f"no img2dataset next to {args.img2dataset_python}; install it (see --help) or --skip-img2dataset")

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_prep_"))
    images = make_images(work / "images", args.n, width, height)
    tools = [("clipalign", run_clipalign)] + ([] if args.skip_img2dataset else [("img2dataset", run_img2dataset)])
    results = []
    try:
        for mode in args.modes.split(","):
            row: dict = {"mode": mode, "n": args.n, "runs": {name: [] for name, _ in tools}}
            for _ in range(args.repeats):  # alternating, so that a slow spell of the machine hits both tools
                for name, run in tools:
                    r = run_tool(run, mode, images, work / f"out_{mode}_{name}", args)
                    row["runs"][name].append(r)
                    print(f"{mode:5s} {name:11s} {r['written']:7d} images in {r['seconds']:7.1f} s = "
                          f"{r['images_per_s']:7.1f} images/s, {r['cpu_ms_per_image']:5.2f} CPU ms/image "
                          f"(server {r['server_cpu_ms_per_image']:.2f})", flush=True)
            for name, _ in tools:
                row[name] = statistics.median(r["images_per_s"] for r in row["runs"][name])
            if "img2dataset" in row:
                row["ratio"] = row["clipalign"] / row["img2dataset"]
                print(f"{mode:5s} clipalign / img2dataset = {row['ratio']:.2f}x (medians of {args.repeats})", flush=True)
            results.append(row)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
