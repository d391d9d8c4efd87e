"""Ablation of the training objectives on the embedded corpus, same data budget for each.

Trains one run per variant (and seed) with ``clipalign train``, evaluates each on the held-out
sets with ``clipalign eval``, and writes ``ablation.json`` and a Markdown table::

    python scripts/ablation.py --data demo_out/shards --eval demo_out/corpus/eval --out ablation \
        --steps 500 --seeds 0 1

Every variant sees the same batches (same steps, batch size and seed); what each objective
costs in samples/s is measured separately by ``scripts/bench_train.py``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from clipalign.formats.folders import RunFolder

VARIANTS: dict[str, list[str]] = {
    "contrastive": ["--mlm-weight", "0"],
    "+ mlm": [],
    "+ mlm + simclr": ["--image-ssl", "simclr", "--image-ssl-weight", "0.5"],
    "+ mlm + queue": ["--queue-size", "1024", "--momentum", "0.99"],
    "contrastive + queue": ["--mlm-weight", "0", "--queue-size", "1024", "--momentum", "0.99"],
    "+ mlm + simclr + queue": ["--image-ssl", "simclr", "--image-ssl-weight", "0.5", "--queue-size", "1024",
                               "--momentum", "0.99"],
}
COLUMNS = [("shape_seen", "acc1"), ("shape_unseen", "acc1"), ("color_seen", "acc1"), ("color_unseen", "acc1"),
           ("retrieval", "image_retrieval_recall@1"), ("retrieval", "image_retrieval_recall@10"),
           ("retrieval", "text_retrieval_recall@10")]


def _run(name: str, seed: int, args: argparse.Namespace) -> dict:
    run = Path(args.out) / f"{name.replace(' ', '').replace('+', '_')}_s{seed}"
    train = [sys.executable, "-m", "clipalign", "train", "--data", args.data, "--out", str(run), "--model", args.model,
             "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--warmup", "30",
             "--seed", str(seed), "--workers", str(args.workers), "--precision", args.precision, "--no-progress",
             "--checkpoint-every", str(args.steps), "--resume", *VARIANTS[name], *args.train_args]
    subprocess.run(train, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sets = sorted(str(p) for p in Path(args.eval).iterdir() if p.is_dir())
    subprocess.run([sys.executable, "-m", "clipalign", "eval", "--checkpoint", str(run), "--data", *sets,
                    "--out", str(run / "eval.json"), "--no-progress"], check=True, capture_output=True)
    results = json.loads((run / "eval.json").read_text())["results"]
    summary = json.loads(RunFolder(run).summary.read_text())
    row = {"variant": name, "seed": seed, "samples_per_s": summary["samples_per_s"],
           "metrics": {f"{s}/{m}": results[s]["metrics"][m] for s, m in COLUMNS if s in results}}
    (run / "result.json").write_text(json.dumps(row) + "\n")  # kept even if a later run fails
    return row


def _table(rows: list[dict]) -> str:
    keys = [f"{s}/{m}" for s, m in COLUMNS]
    head = "| variant | " + " | ".join(k.replace("image_retrieval_recall@", "t→i R@").replace(
        "text_retrieval_recall@", "i→t R@").replace("/acc1", " acc1") for k in keys) + " |"
    lines = [head, "|" + "---|" * (len(keys) + 1)]
    for name in VARIANTS:
        runs = [r for r in rows if r["variant"] == name]
        if not runs:
            continue
        cells = []
        for k in keys:
            values = [100 * r["metrics"][k] for r in runs if k in r["metrics"]]
            spread = f" ± {statistics.pstdev(values):.1f}" if len(values) > 1 else ""
            cells.append(f"{statistics.mean(values):.1f}{spread}" if values else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="training shards")
    p.add_argument("--eval", required=True, help="folder of wds/ evaluation sets (synth's eval/)")
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="ca-tiny")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--parallel", type=int, default=1, help="runs at a time (one per GPU or a big CPU)")
    p.add_argument("--train-args", nargs=argparse.REMAINDER, default=[], help="passed to every clipalign train")
    args = p.parse_args(argv)
    jobs = [(name, seed) for seed in args.seeds for name in args.variants]
    with ThreadPoolExecutor(args.parallel) as pool:
        rows = list(pool.map(lambda job: _run(*job, args), jobs))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "ablation.json").write_text(json.dumps({"args": vars(args), "runs": rows}, indent=2) + "\n")
    table = _table(rows)
    (Path(args.out) / "ablation.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
