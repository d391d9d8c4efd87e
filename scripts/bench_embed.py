"""Embedding speed: ``clipalign embed`` against a plain open_clip ``encode_image`` loop, side by side.

    python scripts/bench_embed.py --model ca-small --images 3000 --json docs/bench/embed.json

Writes ``--images`` JPEGs (``--size`` px, drawn shapes) into a folder and one model's random
weights into a file, then embeds the folder, one after the other in this process:

- open_clip: ``open_clip.create_model_and_transforms(model)`` with those weights, its own eval
  preprocessing, and the loop its README shows, batched: ``Image.open`` → ``preprocess`` →
  ``torch.stack`` → ``model.encode_image`` under ``torch.no_grad()`` in fp32;
- clipalign: what ``clipalign embed DIR --model M --pretrained F`` runs once its model is built
  (``retrieval.embed.embed_collection``: vectors and metadata written), in fp32 and in bf16,
  each with ``--exact-decode`` (every JPEG decoded whole, as open_clip does) and without (the
  default: a JPEG over twice the model's input decoded at a reduced scale).

Each row is timed from the first file opened to the last vector (model build excluded), best of
``--repeats``; the machine is printed with the table. Run nothing else meanwhile.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def write_images(folder: Path, n: int, size: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(n):
        image = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x, y = rng.integers(0, size, 2)
            r = int(rng.integers(size // 16, size // 4))
            draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        image.save(folder / f"{i:06d}.jpg", quality=90)


def open_clip_loop(model_name: str, weights: Path, folder: Path, batch_size: int) -> tuple[float, np.ndarray]:
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(model_name)
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    start = time.perf_counter()
    feats, batch = [], []
    with torch.no_grad():
        for path in sorted(folder.iterdir()):
            batch.append(preprocess(Image.open(path).convert("RGB")))
            if len(batch) == batch_size:
                feats.append(model.encode_image(torch.stack(batch)))
                batch = []
        if batch:
            feats.append(model.encode_image(torch.stack(batch)))
    seconds = time.perf_counter() - start
    out = torch.cat(feats)
    return seconds, torch.nn.functional.normalize(out, dim=-1).numpy()


def clipalign_embed(model_name: str, weights: Path, folder: Path, batch_size: int, precision: str,
                    out: Path, exact_decode: bool = False) -> tuple[float, np.ndarray]:
    """``clipalign embed FOLDER --model M --pretrained F``'s work after the model is built."""
    from clipalign.model_source import ModelSource, load_model_source
    from retrieval.embed import embed_collection, load_embeddings, resolve_units
    from retrieval.identity import model_identity

    model, transform, tokenizer, meta = load_model_source(ModelSource(model=model_name, pretrained=str(weights)))
    identity = model_identity(meta["model_name"], model.state_dict())
    start = time.perf_counter()
    embed_collection(model, transform, tokenizer, resolve_units(folder), out, identity=identity, captions=False,
                     batch_size=batch_size, precision=precision, exact_decode=exact_decode, dtype="float32")
    seconds = time.perf_counter() - start
    vectors, rows, _ = load_embeddings(out)
    return seconds, vectors["image"][np.argsort([r["key"] for r in rows])]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ca-small")
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--size", type=int, default=256, help="side of the JPEGs written (the model resizes them)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    from clipalign.factory import create_model
    from clipalign.machine import describe, summary_line
    from clipalign.precision import native_bf16

    machine = describe()
    print(f"machine: {summary_line(machine)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder, weights = Path(tmp) / "images", Path(tmp) / "weights.pt"
        write_images(folder, a.images, a.size)
        torch.manual_seed(0)
        torch.save(create_model(a.model, mlm_head=False).clip.state_dict(), weights)
        runs = [("open_clip encode_image loop, fp32", lambda r: open_clip_loop(a.model, weights, folder, a.batch_size))]
        for precision in ("fp32", "bf16") if native_bf16() else ("fp32",):
            for exact in (True, False):
                runs.append((f"clipalign embed, {precision}" + (", --exact-decode" if exact else ""),
                             lambda r, precision=precision, exact=exact: clipalign_embed(
                                 a.model, weights, folder, a.batch_size, precision,
                                 Path(tmp) / f"emb_{precision}_{exact}_{r}", exact)))
        reference = None
        print(f"{'run':<40} {'images/s':>9} {'vs open_clip':>12} {'max |Δ| to open_clip':>21}")
        for name, run in runs:
            best, vectors = None, None
            for r in range(a.repeats):
                seconds, vectors = run(r)
                best = seconds if best is None else min(best, seconds)
            if reference is None:
                reference = vectors
            rate = a.images / best
            row = {"name": name, "images_per_s": rate, "seconds": best,
                   "max_abs_diff": float(np.abs(vectors - reference).max())}
            row["speedup"] = rate / rows[0]["images_per_s"] if rows else 1.0
            rows.append(row)
            print(f"{name:<40} {rate:9.1f} {row['speedup']:11.2f}x {row['max_abs_diff']:21.2e}", flush=True)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"model": a.model, "images": a.images, "size": a.size,
                                            "batch_size": a.batch_size, "machine": machine, "rows": rows,
                                            "command": " ".join(["python", "scripts/bench_embed.py", *(argv or sys.argv[1:])])},
                                           indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
