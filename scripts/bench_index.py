"""Benchmark clipalign's ``auto`` index against autofaiss's choice, on the same vectors and budget.

For each size (10k, 100k, 1M) and data kind (random on the sphere, clustered), both tools build
an index within ``--max-memory``; both are then measured here, by the same code: build time,
index size, p50/p99 single-query latency, batched latency per query, and recall@10 against
exact search on held-out queries (never in the index). Also ``clipalign search`` cold start.

autofaiss runs in its own venv (its pins clash with ours; see docs/retrieval.md):
    python3 -m venv .venv-bench-faiss && .venv-bench-faiss/bin/pip install autofaiss "pyarrow<17" "faiss-cpu==1.7.4"

    .venv/bin/python scripts/bench_index.py --quick            # 10k only
    .venv/bin/python scripts/bench_index.py --out bench_index.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from retrieval.choose import parse_memory  # noqa: E402
from retrieval.faiss_parts import build_target  # noqa: E402
from retrieval.tune import batched_ms, recall_at_k  # noqa: E402

AUTOFAISS = """
import json, sys, time
from autofaiss import build_index
emb, out, budget, query_ms, cores = sys.argv[1:6]
t0 = time.perf_counter()
_, infos = build_index(embeddings=emb, index_path=out + "/knn.index", index_infos_path=out + "/infos.json",
                       max_index_memory_usage=budget, current_memory_available="%dG" % 64, metric_type="ip",
                       max_index_query_time_ms=float(query_ms), min_nearest_neighbors_to_retrieve=10,
                       nb_cores=int(cores) or None, verbose=30)
json.dump({"build_s": time.perf_counter() - t0, "infos": infos}, open(out + "/result.json", "w"))
"""


def unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def make_vectors(kind: str, n: int, dim: int, seed: int) -> np.ndarray:
    """(n, dim) float32 unit vectors.

    ``random``: uniform on the sphere (the worst case: no structure for any index to use).
    ``clustered``: like real image embeddings, low intrinsic dimension: 1000 centres, each
    point its centre plus a move in a random 32-d subspace plus a little isotropic noise.
    """
    rng = np.random.default_rng(seed)
    if kind == "clustered":
        centres = unit(rng.standard_normal((1000, dim), dtype=np.float32))
        basis = rng.standard_normal((32, dim), dtype=np.float32) / np.sqrt(dim)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        noise = rng.standard_normal((m, dim), dtype=np.float32)
        if kind == "random":
            out[s : s + m] = unit(noise)
        else:
            z = rng.standard_normal((m, 32), dtype=np.float32)
            out[s : s + m] = unit(centres[rng.integers(0, 1000, m)] + 0.6 * z @ basis + 0.3 * noise / np.sqrt(dim))
    return out


def measure(index: faiss.Index, queries: np.ndarray, truth: np.ndarray, k: int = 10) -> dict:
    """The same measurement for every index: recall@k, single-query p50/p99 and batched latency (ms).

    Batched latency is ``retrieval.tune.batched_ms``, the measurement clipalign tunes with.
    """
    _, ids = index.search(queries, k)
    batched = batched_ms(index, queries, k)
    single = []
    for q in queries[:300]:
        t0 = time.perf_counter()
        index.search(q[None], k)
        single.append((time.perf_counter() - t0) * 1000)
    return {"recall@10": round(recall_at_k(ids, truth), 4), "p50_ms": round(float(np.percentile(single, 50)), 4),
            "p99_ms": round(float(np.percentile(single, 99)), 4), "batched_ms": round(batched, 5),
            "memory_mb": round(len(faiss.serialize_index(index)) / 2**20, 1)}


def run_clipalign(vectors: np.ndarray, budget: int, target: float) -> tuple[faiss.Index, dict]:
    t0 = time.perf_counter()
    index, stats = build_target(vectors, budget, target_recall=target)
    return index, {"build_s": round(time.perf_counter() - t0, 2), "choice": stats["factory"],
                   "param": ",".join(f"{k}={v}" for k, v in stats["search_param"].items()),  # as autofaiss writes it
                   "tuned_recall": stats["recall@10"]}


def run_autofaiss(vectors: np.ndarray, budget: str, python: str, query_ms: float, work: Path) -> tuple[faiss.Index, dict]:
    emb = work / "emb"
    emb.mkdir(parents=True, exist_ok=True)
    np.save(emb / "part.npy", vectors)
    done = subprocess.run([python, "-c", AUTOFAISS, str(emb), str(work), budget, str(query_ms), str(os.cpu_count() or 0)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        sys.exit(f"autofaiss failed:\n{done.stderr[-4000:]}")
    result = json.loads((work / "result.json").read_text())
    index = faiss.read_index(str(work / "knn.index"))
    param = result["infos"].get("index_param")
    if param:  # autofaiss's tuned search parameters, e.g. "nprobe=16,efSearch=32"
        faiss.ParameterSpace().set_index_parameters(index, param)
    return index, {"build_s": round(result["build_s"], 2), "choice": result["infos"].get("index_key"), "param": param}


def toy_index(root: Path, n: int = 48) -> Path:
    """An index folder over ``n`` coloured squares with captions, embedded by an untrained
    ca-nano: all a search's cold start needs (an untrained model costs what a trained one does)."""
    import torch
    from PIL import Image

    from clipalign.checkpoint import save_checkpoint
    from clipalign.factory import create_model_and_transforms
    from retrieval.build import index_images

    torch.manual_seed(0)
    model, _, _ = create_model_and_transforms("ca-nano")
    checkpoint = save_checkpoint(root / "ca-nano.pt", {"model_name": "ca-nano", "step": 0, "model": model.state_dict()})
    images = root / "images"
    images.mkdir()
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}
    rng = np.random.default_rng(0)
    for i in range(n):
        name, rgb = list(colours.items())[i % len(colours)]
        pixels = np.full((32, 32, 3), 128, np.uint8)
        x, y = rng.integers(0, 22, 2)
        pixels[y : y + 10, x : x + 10] = rgb
        Image.fromarray(pixels).save(images / f"{i:05d}.png")
        (images / f"{i:05d}.txt").write_text(f"a {name} square\n")
    index_images(checkpoint, images, root / "index", batch_size=16)
    return root / "index"


def cold_start(runs: int = 3) -> dict:
    """Wall time of ``clipalign search`` in a fresh process, on a tiny index built here."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = toy_index(Path(tmp), n=48)
        cmd = [sys.executable, "-m", "clipalign", "search", "--index", str(folder), "--text", "a red square", "-k", "5"]
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
            times.append(time.perf_counter() - t0)
    return {"median_s": round(statistics.median(times), 3), "runs": [round(t, 3) for t in times]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--quick", action="store_true", help="10k vectors only")
    p.add_argument("--kinds", default="random,clustered")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--max-memory", default="1G")
    p.add_argument("--target-recall", type=float, default=0.95)
    p.add_argument("--autofaiss-python", default=str(ROOT / ".venv-bench-faiss" / "bin" / "python"))
    p.add_argument("--autofaiss-query-ms", type=float, default=1.0,
                   help="autofaiss's max_index_query_time_ms: it tunes its parameters to this (issue #6: 1 ms)")
    p.add_argument("--no-autofaiss", action="store_true")
    p.add_argument("--no-cold-start", action="store_true")
    p.add_argument("--out", default=None, help="write all results as JSON here")
    args = p.parse_args(argv)
    sizes = [10_000] if args.quick else [int(s) for s in args.sizes.split(",")]
    budget = parse_memory(args.max_memory)
    use_autofaiss = not args.no_autofaiss and Path(args.autofaiss_python).is_file()
    if not args.no_autofaiss and not use_autofaiss:
        print(f"autofaiss venv not found at {args.autofaiss_python}: clipalign only", file=sys.stderr)
    rows = []
    header = (f"{'data':<10} {'n':>8}  {'tool':<10} {'index':<56} {'build s':>8} {'MiB':>7} {'p50 ms':>7} {'p99 ms':>7} "
              f"{'batch ms':>8} {'R@10':>6}")
    print(header)
    for n in sizes:
        for kind in args.kinds.split(","):
            data = make_vectors(kind, n + args.queries, args.dim, seed=n)
            vectors, queries = data[: n], np.ascontiguousarray(data[n:])
            _, truth = faiss.knn(queries, vectors, 10, metric=faiss.METRIC_INNER_PRODUCT)
            tools = [("clipalign", lambda: run_clipalign(vectors, budget, args.target_recall))]
            if use_autofaiss:
                tools.append(("autofaiss", lambda: run_autofaiss(vectors, args.max_memory, args.autofaiss_python,
                                                                 args.autofaiss_query_ms, Path(work))))
            for tool, build in tools:
                with tempfile.TemporaryDirectory() as work:
                    index, info = build()
                    row = {"data": kind, "n": n, "dim": args.dim, "tool": tool, **info, **measure(index, queries, truth)}
                    del index
                rows.append(row)
                label = f"{row['choice']} {row['param'] or ''}"[:56]
                print(f"{kind:<10} {n:>8}  {tool:<10} {label:<56} {row['build_s']:>8.1f} {row['memory_mb']:>7.1f} "
                      f"{row['p50_ms']:>7.3f} {row['p99_ms']:>7.3f} {row['batched_ms']:>8.4f} {row['recall@10']:>6.3f}",
                      flush=True)
    result = {"max_memory": args.max_memory, "dim": args.dim, "queries": args.queries, "faiss_threads": faiss.omp_get_max_threads(),
              "cpu_count": os.cpu_count(), "results": rows}
    if not args.no_cold_start:
        result["search_cold_start"] = cold_start()
        print(f"clipalign search cold start: {result['search_cold_start']['median_s']:.2f} s (median of 3)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
