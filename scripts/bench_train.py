"""Training speed: ``clipalign train`` against ``open_clip_train`` on the same shards, side by side.

    python scripts/bench_train.py --model ca-small --batch-size 128 --json docs/bench/train.json

Writes ``--shards`` synthetic 64 px JPEG shards (captions pre-tokenised as ``clipalign prep
--tokenize`` stores them; open_clip_train reads the same ``jpg``/``txt``), then runs, one after
the other, each trainer as a fresh process for ``--steps`` steps and reports the median
samples/s of the steps after ``--warmup`` (each step timed from the end of the previous one,
so data-loader waits count; both trainers log every step). With ``--repeats N`` the rows run in
turn N times and each reports the median of its N runs. Rows:

- open_clip_train (installed open_clip_torch, through ``scripts/run_open_clip_train.py``) in
  fp32 and ``amp_bf16``, and ``amp_bf16`` with the math attention kernels or with freed memory
  kept (``GLIBC_TUNABLES`` set to what ``clipalign train`` sets itself, ``clipalign.memory``);
- clipalign in fp32 and bf16 contrastive-only (MLM and SimCLR off: the like-for-like rows), bf16
  with ``--system-malloc`` (what keeping freed memory buys), then the cost of each objective:
  MLM on, MLM on a fraction of the batch, image-conditioned MLM, patch dropout with and without
  MAE on the dropped patches, SimCLR at 0.5 (the default objective), the MoCo queue.

Model FLOPs utilisation: FLOPs of one training step counted by
``torch.utils.flop_counter.FlopCounterMode`` on a batch of these shards (open_clip's row:
the full padded context, as it runs it; clipalign's: what it runs), times samples/s, over
the matmul ceiling measured in the same run. Peak RSS and minor page faults are the trainer
process's whole run (``os.wait4``: its start-up and its data loader workers included). Run
nothing else on the machine meanwhile: two compute-heavy processes on 2 cores slow each other
by far more than 2x.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import webdataset as wds

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from clipalign.memory import glibc_tunables  # noqa: E402

CONFIGS = ROOT / "clipalign" / "model_configs"
REFERENCE_BF16_CEILING = 950e9  # ../shared/MEASURED.md, bf16 matmul on a quiet AMD EPYC (AMX Xeons: ~3,090e9)


@dataclass
class Row:
    name: str
    trainer: str  # "clipalign" or "open_clip_train"
    precision: str  # "fp32" or "bf16"
    args: list[str] = field(default_factory=list)
    math_attention: bool = False  # open_clip_train only
    env: dict[str, str] = field(default_factory=dict)  # added to the trainer's environment


# Every row names its objectives (SimCLR, the default, is off unless the row says SimCLR), so each
# keeps its meaning whatever the defaults are.
OFF = ["--mlm-weight", "0", "--image-ssl", "none"]  # contrastive-only
MLM = ["--mlm-weight", "0.1", "--image-ssl", "none"]
KEEP_FREED = {"GLIBC_TUNABLES": glibc_tunables(largest=True)}  # clipalign train's malloc settings, for open_clip
ROWS = [
    Row("open_clip_train fp32", "open_clip_train", "fp32"),
    Row("open_clip_train amp_bf16", "open_clip_train", "bf16"),
    Row("open_clip_train amp_bf16 + math attention", "open_clip_train", "bf16", math_attention=True),
    Row("open_clip_train amp_bf16, freed memory kept", "open_clip_train", "bf16", env=KEEP_FREED),
    Row("clipalign fp32, MLM off", "clipalign", "fp32", OFF),
    Row("clipalign fp32, MLM on", "clipalign", "fp32", MLM),
    Row("clipalign bf16, MLM off", "clipalign", "bf16", OFF),
    Row("clipalign bf16, MLM off, system malloc", "clipalign", "bf16", [*OFF, "--system-malloc"]),
    Row("clipalign bf16, MLM on", "clipalign", "bf16", MLM),
    Row("clipalign bf16, MLM on half the batch", "clipalign", "bf16", [*MLM, "--mlm-fraction", "0.5"]),
    Row("clipalign bf16, MLM on, image-conditioned", "clipalign", "bf16", [*MLM, "--mlm-condition", "image"]),
    Row("clipalign bf16, MLM off, patch dropout 0.5", "clipalign", "bf16", [*OFF, "--patch-dropout", "0.5"]),
    Row("clipalign bf16, MLM off, patch dropout 0.5 + MAE", "clipalign", "bf16",
        ["--mlm-weight", "0", "--patch-dropout", "0.5", "--image-ssl", "mae"]),
    Row("clipalign bf16, MLM off, SimCLR", "clipalign", "bf16",
        ["--mlm-weight", "0", "--image-ssl", "simclr", "--image-ssl-weight", "0.5"]),
    Row("clipalign bf16, MLM off, MoCo queue 4096", "clipalign", "bf16", [*OFF, "--queue-size", "4096"]),
]


def write_shards(folder: Path, model: str, shards: int, per_shard: int, image_size: int) -> str:
    """Synthetic captioned JPEGs with pre-tokenised captions; returns a brace pattern of the shards."""
    from data_prep.synth import train_example
    from data_prep.tokens import npy_bytes, token_ids

    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with wds.TarWriter(str(folder / f"{s:05d}.tar")) as sink:
            for i in range(s * per_shard, (s + 1) * per_shard):
                image, caption, _ = train_example(0, i, image_size)
                buf = io.BytesIO()
                image.convert("RGB").save(buf, format="JPEG", quality=90)
                sink.write({"__key__": f"{i:08d}", "jpg": buf.getvalue(), "txt": caption,
                            "tok.npy": npy_bytes(token_ids(caption, model))})
    return str(folder / f"{{00000..{shards - 1:05d}}}.tar")


def step_flops(model: str, pattern: str, batch_size: int, extra: list[str], full_context: bool) -> float:
    """FLOPs of one training step (forward + backward) per sample, on a batch of the shards."""
    from torch.utils.flop_counter import FlopCounterMode

    from clipalign.cli.train import build_config
    from clipalign.data import resolve_shards, train_loader
    from clipalign.train import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        _, cfg = build_config(["--data", pattern, "--out", tmp, "--model", model, "--batch-size", str(batch_size),
                            "--precision", "fp32", "--workers", "0", *extra])
        trainer = Trainer(cfg)
        batch, _ = next(iter(train_loader(trainer._pipeline(resolve_shards(pattern)), 0)))
    if full_context:
        trainer.drop_padding = lambda b: b
    with FlopCounterMode(display=False) as counter:
        trainer.train_step(batch)
    return counter.get_total_flops() / batch_size


def _clipalign_cmd(row: Row, pattern: str, out: Path, a: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "clipalign", "train", "--data", pattern, "--out", str(out), "--model", a.model,
            "--batch-size", str(a.batch_size), "--steps", str(a.steps), "--warmup", "10", "--precision", row.precision,
            "--workers", str(a.workers), "--log-every", "1", "--checkpoint-every", str(10**9), "--no-tensorboard",
            "--no-progress", *row.args]


def _open_clip_cmd(row: Row, pattern: str, out: Path, a: argparse.Namespace) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "run_open_clip_train.py"), "--model-config-dir", str(CONFIGS),
            *(["--math-attention"] if row.math_attention else []), "--",
            "--train-data", pattern, "--dataset-type", "webdataset", "--train-num-samples", str(a.steps * a.batch_size),
            "--model", a.model, "--batch-size", str(a.batch_size), "--epochs", "1", "--warmup", "10", "--lr", "5e-4",
            "--wd", "0.1", "--grad-clip-norm", "1.0", "--precision", "amp_bf16" if row.precision == "bf16" else "fp32",
            "--workers", str(a.workers), "--log-every-n-steps", "1", "--save-frequency", "0", "--zeroshot-frequency", "0",
            "--val-frequency", "0", "--report-to", "", "--logs", str(out), "--name", "run"]


def step_rates(row: Row, output: str, out: Path) -> list[tuple[float, float]]:
    """(samples/s, seconds waiting for the batch) of every logged step, in order."""
    if row.trainer == "clipalign":
        from clipalign.formats.folders import RunFolder

        lines = [json.loads(line) for line in RunFolder(out).metrics.read_text().splitlines()]
        return [(r["samples_per_s"], r["data_wait_s"]) for r in lines]
    return [(float(rate), float(wait)) for wait, rate in
            re.findall(r"Data \(t\): ([0-9.]+) Batch \(t\): [0-9.]+, ([0-9.]+)/s,", output)]


def run_row(row: Row, pattern: str, a: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = (_clipalign_cmd if row.trainer == "clipalign" else _open_clip_cmd)(row, pattern, out, a)
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **row.env}
        start = time.perf_counter()
        with open(Path(tmp) / "output.log", "w+") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp)
            _, status, usage = os.wait4(proc.pid, 0)  # this trainer's own peak memory and page faults
            proc.returncode = os.waitstatus_to_exitcode(status)
            log.seek(0)
            output = log.read()
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{row.name} failed:\n{output[-3000:]}")
        rates = step_rates(row, output, out)
    if len(rates) <= a.warmup:
        raise RuntimeError(f"{row.name}: only {len(rates)} steps logged")
    return {"name": row.name, "trainer": row.trainer, "precision": row.precision, "args": row.args,
            "math_attention": row.math_attention, "env": row.env, "samples_per_s": statistics.median(r for r, _ in rates[a.warmup:]),
            "data_wait_ms": 1000 * statistics.median(w for _, w in rates[a.warmup:]),
            "steps": len(rates), "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024,
            "minor_faults": usage.ru_minflt, "command": " ".join(cmd)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ca-small", help="model config (clipalign's model_configs or open_clip's)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=40, help="steps per run")
    p.add_argument("--warmup", type=int, default=8, help="first steps left out of the median")
    p.add_argument("--workers", type=int, default=1, help="data loader processes, both trainers")
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--per-shard", type=int, default=512)
    p.add_argument("--repeats", type=int, default=1,
                   help="run the rows in turn this many times and report each row's median (a machine whose "
                        "speed drifts by 10-20 %% between minutes slows every row alike)")
    p.add_argument("--only", nargs="*", default=None, help="run only these rows (exact names, or parts of names)")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)
    # a row's exact name picks that row; any other string, every row whose name contains it
    names = {r.name for r in ROWS}
    rows = [r for r in ROWS if a.only is None or r.name in a.only
            or any(s not in names and s in r.name for s in a.only)]
    from clipalign.machine import describe, matmul_ceiling, summary_line

    machine = describe()
    print(f"machine: {summary_line(machine)}")
    ceilings = {"fp32": matmul_ceiling(torch.float32), "bf16": matmul_ceiling(torch.bfloat16)}
    print(f"matmul ceiling this run: fp32 {ceilings['fp32'] / 1e9:.0f} GFLOP/s, bf16 {ceilings['bf16'] / 1e9:.0f} GFLOP/s")
    with tempfile.TemporaryDirectory() as tmp:
        from clipalign.factory import create_model

        pattern = write_shards(Path(tmp) / "shards", a.model, a.shards, a.per_shard, create_model(a.model).image_size)
        flops = {}
        for row in rows:
            theirs = row.trainer == "open_clip_train"  # the same model and loss, over the full padded context
            flops[row.name] = step_flops(a.model, pattern, a.batch_size, OFF if theirs else row.args,
                                         full_context=theirs)
        runs: dict[str, list[dict]] = {row.name: [] for row in rows}
        print(f"{'run':<46} {'samples/s':>9} {'GFLOP/sample':>12} {'MFU':>6} {'data wait':>9} {'peak RSS':>9} "
              f"{'faults':>7}")
        for repeat in range(a.repeats):  # the rows in turn, so that a drifting machine slows them alike
            for row in rows:
                res = run_row(row, pattern, a)
                runs[row.name].append(res)
                print(f"{row.name:<46} {res['samples_per_s']:9.1f} {flops[row.name] / 1e9:12.2f} "
                      f"{100 * flops[row.name] * res['samples_per_s'] / ceilings[row.precision]:5.1f}% "
                      f"{res['data_wait_ms']:6.1f} ms {res['peak_rss_mb']:6.0f} MB {res['minor_faults'] / 1e3:6.0f}k"
                      + (f"  (round {repeat + 1})" if a.repeats > 1 else ""), flush=True)
        results = []
        for row in rows:
            res = dict(runs[row.name][0])
            rates = [r["samples_per_s"] for r in runs[row.name]]
            res.update(samples_per_s=statistics.median(rates), samples_per_s_each_round=rates,
                       data_wait_ms=statistics.median(r["data_wait_ms"] for r in runs[row.name]),
                       gflop_per_sample=flops[row.name] / 1e9,
                       mfu=flops[row.name] * statistics.median(rates) / ceilings[row.precision])
            results.append(res)
        if a.repeats > 1:
            print(f"median of {a.repeats} rounds:")
            for res in results:
                print(f"{res['name']:<46} {res['samples_per_s']:9.1f} {res['gflop_per_sample']:12.2f} "
                      f"{100 * res['mfu']:5.1f}% {res['data_wait_ms']:6.1f} ms  "
                      f"(rounds: {', '.join(f'{r:.1f}' for r in res['samples_per_s_each_round'])})")
    by_name = {r["name"]: r for r in results}
    ratios = {}
    for ours, theirs in [("clipalign bf16, MLM off", "open_clip_train amp_bf16"),
                         ("clipalign fp32, MLM off", "open_clip_train fp32"),
                         ("clipalign bf16, MLM off", "open_clip_train fp32"),
                         ("clipalign bf16, MLM off", "clipalign bf16, MLM off, system malloc"),
                         ("open_clip_train amp_bf16, freed memory kept", "open_clip_train amp_bf16"),
                         ("clipalign bf16, MLM off", "open_clip_train amp_bf16, freed memory kept"),
                         ("clipalign bf16, MLM on", "clipalign bf16, MLM off"),
                         ("clipalign fp32, MLM on", "clipalign fp32, MLM off"),
                         ("clipalign bf16, MLM on half the batch", "clipalign bf16, MLM off"),
                         ("clipalign bf16, MLM off, SimCLR", "clipalign bf16, MLM off"),
                         ("clipalign bf16, MLM off, MoCo queue 4096", "clipalign bf16, MLM off")]:
        if ours in by_name and theirs in by_name:
            ratio = by_name[ours]["samples_per_s"] / by_name[theirs]["samples_per_s"]
            ratios[f"{ours} / {theirs}"] = ratio
            print(f"{ratio:5.2f}x  {ours} / {theirs}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        summary = {"model": a.model, "batch_size": a.batch_size, "steps": a.steps, "warmup": a.warmup,
                   "repeats": a.repeats,
                   "workers": a.workers, "ceilings_flop_s": ceilings, "reference_bf16_ceiling": REFERENCE_BF16_CEILING,
                   "torch": torch.__version__, "machine": machine, "rows": results, "ratios": ratios}
        Path(a.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
