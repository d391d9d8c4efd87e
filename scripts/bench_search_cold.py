"""Benchmark the cold start of ``clipalign search``: a fresh process, a query, printed results.

Builds a toy index (a random-weights ``--model``, so no data or download is needed) with
``clipalign index``, then times ``python -m clipalign search --index I --text Q --json`` (or, with
``--query image``, ``--image`` one of the indexed images) from process start to exit, ``--runs``
times each (median, min, max), for two folders:

* ``fast``: the index as built, which carries the text and image towers as ONNX
  (``retrieval.query_encoder``, ``retrieval.image_query``);
* ``full``: the same folder without the towers, so the query takes the full model path
  (torch, open_clip and the model built from its weights).

``--before TREE`` also builds and times an index with the clipalign of another checkout
(``git archive <commit> | tar -x -C TREE``), with the same venv: the path as it was. Each
variant's imports are read once with ``-X importtime`` to say whether it imported torch.
Run it with nothing else heavy running (the load average is printed).

    .venv/bin/python scripts/bench_search_cold.py                      # ca-nano, 10 runs each
    .venv/bin/python scripts/bench_search_cold.py --before /tmp/clipalign-before --runs 10 --json out.json
    .venv/bin/python scripts/bench_search_cold.py --model ca-tiny --query image --runs 5
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUERY = "a red circle"
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("square", "circle", "star", "triangle")


def machine() -> dict[str, object]:
    import onnxruntime

    from clipalign.machine import describe

    return {**describe(), "onnxruntime": onnxruntime.__version__, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


def make_data(root: Path, model: str, n_images: int) -> tuple[Path, Path]:
    """A random-weights checkpoint of ``model`` and ``n_images`` captioned coloured squares."""
    import numpy as np
    import torch
    from PIL import Image

    from clipalign.checkpoint import save_checkpoint
    from clipalign.factory import create_model_and_transforms

    torch.manual_seed(0)
    built, _, _ = create_model_and_transforms(model)
    ckpt = save_checkpoint(root / f"{model}.pt", {"model_name": model, "step": 0, "model": built.state_dict()})
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n_images):
        Image.new("RGB", (32, 32), tuple(int(c) for c in rng.integers(0, 256, 3))).save(images / f"{i:05d}.png")
        (images / f"{i:05d}.txt").write_text(f"a {COLOURS[i % len(COLOURS)]} {SHAPES[i % len(SHAPES)]}")
    return Path(ckpt), images


def _env(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree)}


def build(tree: Path, ckpt: Path, images: Path, out: Path) -> tuple[Path, Path]:
    """``clipalign index`` of ``tree`` → ``(the folder as built, a copy without its text tower)``."""
    from clipalign.formats.folders import IndexFolder

    subprocess.run([sys.executable, "-m", "clipalign", "index", "--checkpoint", str(ckpt), "--data", str(images),
                    "--out", str(out / "fast"), "--index", "flat", "--no-progress"],
                   cwd=tree, env=_env(tree), check=True, capture_output=True)
    full = IndexFolder(shutil.copytree(out / "fast", out / "full"))
    for tower in (full.text_query, full.legacy_text_query, full.image_query):  # the ONNX towers, an older TorchScript one
        tower.unlink(missing_ok=True)
    return out / "fast", full.root


def search_command(index: Path, query: list[str], *flags: str) -> list[str]:
    return [sys.executable, *flags, "-m", "clipalign", "search", "--index", str(index), *query, "--json"]


def cold_start(tree: Path, index: Path, runs: int, query: list[str]) -> dict[str, object]:
    """Seconds from process start to exit of ``runs`` fresh searches, and what the first imported."""
    done = subprocess.run(search_command(index, query, "-X", "importtime"), cwd=tree, env=_env(tree),
                          capture_output=True, text=True, check=True)
    imported = {ln.rsplit("|", 1)[1].strip() for ln in done.stderr.splitlines() if ln.startswith("import time:")}
    first = json.loads(done.stdout)["results"]
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = subprocess.run(search_command(index, query), cwd=tree, env=_env(tree), capture_output=True, text=True,
                             check=True)
        times.append(time.perf_counter() - t0)
        assert [h["id"] for h in json.loads(out.stdout)["results"]] == [h["id"] for h in first]
    return {"median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3), "max_s": round(max(times), 3),
            "runs": runs, "imports_torch": "torch" in imported, "imports_open_clip": "open_clip" in imported,
            "imports_onnxruntime": "onnxruntime" in imported, "top_hit": first[0]["id"], "top_score": first[0]["score"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ca-nano", help="architecture of the random-weights model")
    p.add_argument("--images", type=int, default=200, help="images in the toy index")
    p.add_argument("--runs", type=int, default=10, help="fresh processes timed per variant")
    p.add_argument("--query", choices=("text", "image"), default="text", help="a text query, or one of the images")
    p.add_argument("--before", default=None, help="also time the clipalign of this checkout (the path as it was)")
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)

    info = machine()
    print(json.dumps(info), flush=True)
    trees = {"now": ROOT, **({"before": Path(args.before).resolve()} if args.before else {})}
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="bench-search-cold-") as tmp:
        ckpt, images = make_data(Path(tmp), args.model, args.images)
        query = ["--text", QUERY] if args.query == "text" else ["--image", str(images / "00001.png")]
        for label, tree in trees.items():
            fast, full = build(tree, ckpt, images, Path(tmp) / label)
            for variant, index in (("fast", fast), ("full", full)):
                name = f"{label}/{variant}"
                results[name] = cold_start(tree, index, args.runs, query)
                print(f"{name:12s} {json.dumps(results[name])}", flush=True)
    info["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    print(f"\n{args.model}, {args.images} images, {'an image' if args.query == 'image' else 'a text'} query, "
          f"median of {args.runs} fresh processes "
          f"(load average {info['load_avg_1m']} before, {info['load_avg_1m_after']} after):")
    print("| path | median s | min s | max s | imports torch |\n|---|---:|---:|---:|---|")
    for name, r in results.items():
        print(f"| {name} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['max_s']:.3f} | {'yes' if r['imports_torch'] else 'no'} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "model": args.model, "images": args.images,
                                               "query": query, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
