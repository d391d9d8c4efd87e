"""The training loader's CPU: what one loader worker spends on a batch, per image transform.

    python scripts/bench_loader.py --model ca-tiny --batch-size 128 --data demo_out/shards

Runs the trainer's pipeline (``clipalign.data.train_pipeline``: shard reading, shuffle,
decoding, augmentation, tokenising, batching) in this process on one torch thread, as a loader
worker runs it, and reports the median time a batch over ``--batches`` batches after the
shuffle buffer has filled. Rows:

- ``float``: the model's train transform as open_clip builds it, ``ToTensor`` and ``Normalize``
  on every image in the worker (what the trainer ran before 2026-12-02);
- ``uint8``: the same transform split by ``clipalign.pixels.loader_transforms``, the worker
  stopping at uint8 pixels; the trainer's ``normalize_batch`` is timed apart (it runs in the
  trainer's process, on its threads);

each without and with SimCLR's two views (the default objective). Both give the same batch bit
for bit (checked here). Without ``--data``, synthetic 64 px JPEG shards are written first (as
``bench_train.py`` writes them). Run nothing else meanwhile.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def time_row(shards: list[str], transform, views, normalizers, tokenizer, a) -> tuple[dict, dict]:
    from clipalign.data import train_pipeline
    from clipalign.pixels import normalize_batch

    stream = iter(train_pipeline(shards, transform=transform, view_transform=views, tokenizer=tokenizer,
                                 batch_size=a.batch_size, shuffle_buffer=a.shuffle_buffer))
    for _ in range(max(1, a.shuffle_buffer // a.batch_size)):  # fill the shuffle buffer
        next(stream)
    times, norm = [], []
    for _ in range(a.batches):
        start = time.perf_counter()
        batch, _ = next(stream)
        times.append(time.perf_counter() - start)
        start = time.perf_counter()
        batch = normalize_batch(batch, normalizers)
        norm.append(time.perf_counter() - start)
    return {"ms_per_batch": 1000 * statistics.median(times), "normalize_ms": 1000 * statistics.median(norm)}, batch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ca-tiny")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--data", default=None, help="a folder of training shards (default: write synthetic ones)")
    p.add_argument("--batches", type=int, default=20, help="timed batches per row")
    p.add_argument("--shuffle-buffer", type=int, default=2000)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    from clipalign.data import resolve_shards
    from clipalign.factory import create_model_and_transforms, get_tokenizer
    from clipalign.image_ssl import simclr_view_transform
    from clipalign.machine import describe, summary_line
    from clipalign.pixels import loader_transforms

    torch.set_num_threads(1)  # as in a DataLoader worker
    machine = describe()
    print(f"machine: {summary_line(machine)}; loader on 1 thread, this process")
    model, train_transform, _ = create_model_and_transforms(a.model)
    tokenizer = get_tokenizer(a.model)
    tmp = None
    if a.data is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_train import write_shards

        tmp = tempfile.TemporaryDirectory()
        a.data = write_shards(Path(tmp.name), a.model, 4, 1000, model.image_size)
    shards = resolve_shards(a.data)
    view = simclr_view_transform(model.image_size, getattr(model.clip.visual, "image_mean", None),
                                 getattr(model.clip.visual, "image_std", None))
    rows = []
    for views in (None, view):
        batches = {}
        for kind in ("float", "uint8"):
            image_tf, views_tf, normalizers = (loader_transforms(train_transform, views) if kind == "uint8"
                                               else (train_transform, views, {}))
            row, batches[kind] = time_row(shards, image_tf, views_tf, normalizers, tokenizer, a)
            row["name"] = f"{kind}{', SimCLR views' if views else ''}"
            rows.append(row)
            print(f"{row['name']:<22} {row['ms_per_batch']:7.1f} ms/batch in the worker"
                  f" + {row['normalize_ms']:5.1f} ms in the trainer", flush=True)
        same = all(torch.equal(v, batches["uint8"][k]) for k, v in batches["float"].items())
        print(f"  same batch bit for bit: {same}")
        if not same:
            return 1
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"args": vars(a), "machine": machine, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
