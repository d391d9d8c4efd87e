"""Benchmark the bare training step (model + losses + AdamW, no data loader).

Measures samples/s of ``Trainer.train_step`` on random inputs for each setting, side by side
in one process, so that the trainer's defaults rest on numbers taken on the same machine.

    python scripts/bench_train.py --model ca-tiny --batch-size 128

Each setting runs ``--warmup`` untimed steps, then ``--steps`` timed ones; the median step time
is reported. Run nothing else on the machine meanwhile: two compute-heavy processes on 2 cores
slow each other by far more than 2x.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time

import torch

from clipalign.precision import attention_backend
from clipalign.train import TrainConfig, Trainer


def bench(model: str, batch_size: int, precision: str, attention: str, mlm_weight: float,
          warmup: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(data="", out=tmp, model=model, batch_size=batch_size, precision=precision,
                          attention=attention, mlm_weight=mlm_weight)
        trainer = Trainer(cfg)
    size = trainer.model.image_size
    images = torch.randn(batch_size, 3, size, size)
    texts = trainer.tokenizer(["a small red triangle at the top left of the picture"] * batch_size)
    times = []
    with attention_backend(attention):
        for i in range(warmup + steps):
            start = time.perf_counter()
            trainer.train_step({"image": images, "text": texts})
            if i >= warmup:
                times.append(time.perf_counter() - start)
    step = statistics.median(times)
    return {"model": model, "batch_size": batch_size, "precision": precision, "attention": attention,
            "mlm_weight": mlm_weight, "step_ms": 1000 * step, "samples_per_s": batch_size / step}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ca-tiny")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--attention", nargs="+", default=["auto", "math"])
    p.add_argument("--mlm-weight", nargs="+", type=float, default=[0.0, 0.1])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    rows = []
    print(f"{'precision':>9} {'attention':>9} {'mlm':>5} {'ms/step':>8} {'samples/s':>9}")
    for precision, attention, mlm in itertools.product(args.precision, args.attention, args.mlm_weight):
        row = bench(args.model, args.batch_size, precision, attention, mlm, args.warmup, args.steps)
        rows.append(row)
        print(f"{precision:>9} {attention:>9} {mlm:>5} {row['step_ms']:8.0f} {row['samples_per_s']:9.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
