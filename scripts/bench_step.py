"""The bare training step: ``Trainer.train_step`` on one fixed batch, no loader, per objective.

    python scripts/bench_step.py --model ca-small --threads 1 --clock cpu
    python scripts/bench_step.py --model ca-small --open-clip-attention   # the towers on nn.MultiheadAttention
    python scripts/bench_step.py --model ca-small --system-malloc         # malloc handing freed memory back

Where ``bench_train.py`` compares whole trainers, this isolates the step (model, losses,
backward, fused AdamW) so that a change to it can be measured in minutes, and ``--profile``
prints where the time goes. ``--clock cpu`` times the process's CPU time with torch on
``--threads`` threads: on a shared 2-core machine, one thread timed in CPU seconds is far less
disturbed by other work than wall time (quote it as such; ``bench_train.py`` gives wall-clock
samples/s). Each row is the median of ``--steps`` steps after 2 warm-up steps, in a fresh
Trainer (same seed, same batch: captions of 6–13 words, the padding the trainer drops), and
gives the process's RSS before and after its timed steps. ``--vary-length`` gives every timed
step a batch of another longest caption instead, so that the width of the text activations
changes from step to step as on real data.

Each row also gives its FLOPs a sample (``FlopCounterMode`` over one step) and its MFU against
the matmul ceiling measured at the start of the run (on wall time, or on one thread's CPU
time). With ``--profile`` it says whether the step is bound by the matrix units: the share of
a profiled step spent in matmul kernels, and the rate those kernels ran at (of three profiled
steps, the one whose time is the median), with its page faults. The operators are timed by
``clipalign.op_timer.OpTimer``, not ``torch.profiler``, whose event buffers move the heap that
the step reuses, so that its fresh pages would be charged to the step's operators.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Each row names its image objective, so it keeps its meaning whatever the defaults are; the first
# (contrastive-only) is the one the others' ratios are taken against.
ROWS = {
    "MLM off, SimCLR off": {"image_ssl": "none"},
    "MLM on": {"mlm_weight": 0.1, "image_ssl": "none"},
    "MLM on, image-conditioned": {"mlm_weight": 0.1, "mlm_condition": "image", "image_ssl": "none"},
    "MLM off, SimCLR (default)": {"image_ssl": "simclr", "image_ssl_weight": 0.5},
    # ViT towers only: FLIP's patch dropout, and MAE on the patches it hid (one encoder pass)
    "MLM off, patch dropout 0.5": {"image_ssl": "none", "patch_dropout": 0.5},
    "MLM off, patch dropout 0.5 + MAE": {"image_ssl": "mae", "image_ssl_weight": 1.0, "patch_dropout": 0.5},
}
PROFILED_STEPS = 3  # --profile's steps; the one whose profiled time is the median is reported
VARY_WORDS = (10, 29)  # --vary-length: the range of a batch's longest caption, in words
WORDS = "a red blue green small large circle square star triangle at the top left bottom right of".split()


def make_batch(model, tokenizer, batch_size: int, views: bool, longest: int | None = None) -> dict[str, torch.Tensor]:
    """One batch: captions of 6-13 words, or (``longest``) of 3 to ``longest`` words, one of them that long."""
    torch.manual_seed(0 if longest is None else longest)
    if longest is None:
        captions = [" ".join(WORDS[j % len(WORDS)] for j in range(i, i + 6 + i % 8)) for i in range(batch_size)]
    else:
        lengths = [longest] + torch.randint(3, longest + 1, (batch_size - 1,)).tolist()
        captions = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(n)) for i, n in enumerate(lengths)]
    size = model.image_size
    batch = {"image": torch.randn(batch_size, 3, size, size), "text": tokenizer(captions)}
    if views:
        batch["views"] = torch.randn(batch_size, 2, 3, size, size)
    return batch


def rss_mb() -> float:
    """This process's resident memory now (Linux), in MB."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def time_row(name: str, overrides: dict, a: argparse.Namespace) -> dict:
    from clipalign.op_timer import MATMUL_OPS, OpTimer
    from clipalign.precision import attention_backend
    from clipalign.train import Trainer
    from clipalign.train_config import TrainConfig

    cfg = TrainConfig(data="/nonexistent", out="/tmp/bench_step_run", model=a.model, batch_size=a.batch_size,
                      steps=10_000, warmup=1, precision=a.precision, tensorboard=False, **overrides)
    trainer = Trainer(cfg)
    if a.open_clip_attention:  # undo clipalign.attention's swap: the reference row
        for module in trainer.model.modules():
            if type(module).__name__ == "FastMultiheadAttention":
                module.__class__ = torch.nn.MultiheadAttention
    views = trainer.objectives.view_transform is not None
    batch = make_batch(trainer.model, trainer.tokenizer, a.batch_size, views)
    # --vary-length: every timed step a batch whose longest caption has another length, as on real data
    batches = ([make_batch(trainer.model, trainer.tokenizer, a.batch_size, views, longest)
                for longest in torch.randint(VARY_WORDS[0], VARY_WORDS[1] + 1, (a.steps,), generator=torch.Generator()
                                             .manual_seed(0)).tolist()] if a.vary_length else [batch] * a.steps)
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    trainer.model.train()
    with attention_backend(cfg.attention):
        for _ in range(2):
            trainer.train_step(batch)
        times, rss_start = [], rss_mb()
        for step_batch in batches:
            start = clock()
            trainer.train_step(step_batch)
            times.append(clock() - start)
        rss_end = rss_mb()
        with FlopCounterMode(display=False) as counter:
            trainer.train_step(batch)
        flops = counter.get_flop_counts()["Global"]
        row = {"name": name, "overrides": overrides, "rss_mb_start": rss_start, "rss_mb_end": rss_end,
               "flops_per_step": sum(flops.values()),
               "matmul_flops_per_step": sum(v for op, v in flops.items() if str(op).split(".")[1] in MATMUL_OPS)}
        if a.profile:
            profiled = []  # PROFILED_STEPS steps under the op timer: one step alone may be an outlier
            for _ in range(PROFILED_STEPS):
                before = resource.getrusage(resource.RUSAGE_SELF)
                with OpTimer(clock) as timer:
                    start = clock()
                    trainer.train_step(batch)
                    elapsed = clock() - start
                after = resource.getrusage(resource.RUSAGE_SELF)
                profiled.append((elapsed, timer, after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime))
            elapsed, timer, faults, system = sorted(profiled, key=lambda p: p[0])[PROFILED_STEPS // 2]  # the median
            print(timer.table(elapsed))
            row.update(profiled_ms=1000 * elapsed, matmul_ms=1000 * timer.matmul_seconds(),
                       profiled_minor_faults=faults, profiled_system_ms=1000 * system,
                       operators_ms={name: 1000 * sec for name, sec in timer.seconds.most_common()})
    step = statistics.median(times)
    return {**row, "ms_per_step": 1000 * step, "samples_per_s": a.batch_size / step}


def describe_row(row: dict, first: dict, ceiling: float | None, batch_size: int) -> str:
    """A row's line: its step, samples/s, ratio to the first row, FLOPs, MFU, matmul share."""
    line = (f"{row['name']:<32} {row['ms_per_step']:8.0f} ms/step {row['samples_per_s']:7.1f} samples/s  "
            f"{row['samples_per_s'] / first['samples_per_s']:5.2f}x  {row['flops_per_step'] / batch_size / 1e9:5.2f} "
            f"GFLOP/sample")
    if "mfu" in row:
        line += f"  MFU {100 * row['mfu']:4.1f} %"
    line += f"  RSS {row['rss_mb_start']:.0f} -> {row['rss_mb_end']:.0f} MB"
    if "matmul_ms" in row:
        rate = row["matmul_flops_per_step"] / (row["matmul_ms"] / 1000)
        line += (f"  matmuls {100 * row['matmul_ms'] / row['profiled_ms']:4.1f} % of the profiled step, at "
                 f"{rate / 1e9:.0f} GFLOP/s" + (f" ({100 * rate / ceiling:.0f} % of the ceiling)" if ceiling else "")
                 + f", {row['profiled_minor_faults']} page faults")
    return line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ca-small")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--steps", type=int, default=6, help="timed steps per row (after 2 warm-up steps)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--clock", choices=["cpu", "wall"], default="wall")
    p.add_argument("--only", nargs="*", choices=list(ROWS), default=[n for n in ROWS if "patch dropout" not in n],
                   help="rows to run; the patch-dropout rows (ViT towers only) run only when named here")
    p.add_argument("--open-clip-attention", action="store_true", help="run the towers on nn.MultiheadAttention")
    p.add_argument("--vary-length", action="store_true",
                   help=f"give every timed step a batch whose longest caption has {VARY_WORDS[0]}-{VARY_WORDS[1]} words "
                        "(the padding the trainer drops then varies, as on real data); rows report RSS before and after")
    p.add_argument("--system-malloc", action="store_true",
                   help="leave malloc as it is (by default freed memory is kept, as `clipalign train` does)")
    p.add_argument("--profile", action="store_true", help="also time every operator of a step per row (clipalign.op_timer)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if not a.system_malloc:
        from clipalign.memory import keep_freed_memory

        keep_freed_memory(largest=True)

    from clipalign.machine import describe, matmul_ceiling, summary_line

    machine = describe()
    print(f"machine: {summary_line(machine)}; clock: {a.clock}")
    # MFU needs a clock that the ceiling's wall time compares with: wall, or one thread's CPU time
    ceiling = None
    if a.clock == "wall" or torch.get_num_threads() == 1:
        from clipalign.precision import resolve_precision

        dtype = torch.bfloat16 if resolve_precision(a.precision) == "bf16" else torch.float32
        ceiling = matmul_ceiling(dtype)
        print(f"matmul ceiling this run ({dtype}): {ceiling / 1e9:.0f} GFLOP/s")
    rows = []
    for name in a.only:
        row = time_row(name, ROWS[name], a)
        if ceiling and not a.vary_length:  # the FLOPs are the fixed batch's: no MFU for varying ones
            row["mfu"] = row["flops_per_step"] / (row["ms_per_step"] / 1000) / ceiling
        rows.append(row)
        print(describe_row(row, rows[0], ceiling, a.batch_size), flush=True)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"args": vars(a), "machine": machine, "ceiling_flops": ceiling,
                                            "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
