"""Ablation of the training objectives, same data budget for each, on the embedded corpus or a real one.

Trains one run per variant (and seed) with ``clipalign train``, evaluates each on the held-out
sets with ``clipalign eval``, and writes ``ablation.json`` and a Markdown table (mean ± spread
over seeds; per classification set acc@1, per retrieval set text→image R@1 and R@10)::

    python scripts/ablation.py --data demo_out/shards --eval demo_out/corpus/eval --out ablation \
        --steps 500 --seeds 0 1
    python scripts/ablation.py --data EMOJI/train_all --eval EMOJI/eval_* --out ablation_emoji \
        --steps 300 --seeds 0 1 2 --variants contrastive "+ mlm" "+ mlm image" "+ mlm image content"

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

# Every variant names its image objective, so that a row keeps its meaning whatever the defaults
# are (the default objective is contrastive + SimCLR at 0.5; the text MLM is off by default).
MLM = ["--mlm-weight", "0.1"]  # the masked-token loss at the weight tried
NO_SSL = ["--image-ssl", "none"]
CONTRASTIVE = ["--mlm-weight", "0", *NO_SSL]  # contrastive-only
SIMCLR = ["--image-ssl", "simclr", "--image-ssl-weight", "0.5"]
QUEUE = ["--queue-size", "1024", "--momentum", "0.99"]
VARIANTS: dict[str, list[str]] = {
    "contrastive": CONTRASTIVE,
    "+ mlm": [*MLM, *NO_SSL],
    "+ mlm content": [*MLM, *NO_SSL, "--mlm-target", "content"],
    "+ mlm image": [*MLM, *NO_SSL, "--mlm-condition", "image"],
    "+ mlm image content": [*MLM, *NO_SSL, "--mlm-condition", "image", "--mlm-target", "content"],
    "contrastive + simclr": ["--mlm-weight", "0", *SIMCLR],
    # ViT towers only: MAE reconstructs the patches FLIP's patch dropout hid from the same pass
    # (at weight 1, the image objective's weight before SimCLR's 0.5 became the default)
    "contrastive + flip": [*CONTRASTIVE, "--patch-dropout", "0.5"],
    "contrastive + flip + mae": ["--mlm-weight", "0", "--patch-dropout", "0.5", "--image-ssl", "mae",
                                 "--image-ssl-weight", "1.0"],
    "+ mlm + simclr": [*MLM, *SIMCLR],
    "+ mlm + queue": [*MLM, *NO_SSL, *QUEUE],
    "contrastive + queue": [*CONTRASTIVE, *QUEUE],
    "+ mlm + simclr + queue": [*MLM, *SIMCLR, *QUEUE],
    # equal wall-clock: contrastive-only given the steps its saved time buys (below), and FLIP the
    # steps its cheaper step buys
    "contrastive, + mlm's time": CONTRASTIVE,
    "contrastive, + simclr's time": CONTRASTIVE,
    "contrastive + flip, contrastive's time": [*CONTRASTIVE, "--patch-dropout", "0.5"],
}
# Variants run for more steps than --steps: a step with the text MLM costs 1.32x one without and a
# SimCLR step 2.62x on ca-tiny (BENCHMARKS.md, "objective costs"; scripts/bench_step.py), so
# contrastive-only gets that many more steps in the same time; a ca-tiny-vit step with half the
# patches dropped costs 0.53x a full one (so 1.9x the steps), and with MAE on them 0.98x (MAE's
# equal-time row is its equal-samples row).
STEP_SCALE = {"contrastive, + mlm's time": 1.32, "contrastive, + simclr's time": 2.62,
              "contrastive + flip, contrastive's time": 1.90}
# What the table shows of each set, by its task.
SHOWN = {"zeroshot_classification": ("acc1",),
         "zeroshot_retrieval": ("image_retrieval_recall@1", "image_retrieval_recall@10")}


def _run(name: str, seed: int, args: argparse.Namespace) -> dict:
    slug = name.replace(" ", "").replace("+", "_").replace(",", "").replace("'", "")  # "+ mlm" -> "_mlm"
    run = Path(args.out) / f"{slug}_s{seed}"
    if (run / "result.json").is_file():  # a re-run of the ablation keeps the runs it finished
        return json.loads((run / "result.json").read_text())
    steps = round(args.steps * STEP_SCALE.get(name, 1.0))
    train = [sys.executable, "-m", "clipalign", "train", "--data", args.data, "--out", str(run), "--model", args.model,
             "--steps", str(steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--warmup", "30",
             "--seed", str(seed), "--workers", str(args.workers), "--precision", args.precision, "--no-progress",
             "--checkpoint-every", str(steps), "--resume", *VARIANTS[name], *args.train_args]
    subprocess.run(train, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    subprocess.run([sys.executable, "-m", "clipalign", "eval", "--checkpoint", str(run), "--data", *args.eval,
                    "--out", str(run / "eval.json"), "--no-progress"], check=True, capture_output=True)
    results = json.loads((run / "eval.json").read_text())["results"]
    summary = json.loads(RunFolder(run).summary.read_text())
    row = {"variant": name, "seed": seed, "samples_per_s": summary["samples_per_s"],
           "metrics": {f"{s}/{m}": r["metrics"][m] for s, r in results.items() for m in SHOWN.get(r["task"], ())}}
    (run / "result.json").write_text(json.dumps(row) + "\n")  # kept even if a later run fails
    return row


def _sets(paths: list[str]) -> list[str]:
    """The wds/ sets given, or found one level below a given folder (synth's eval/).

    Files are passed over, so that a glob such as ``EMOJI/eval_*`` may also match the CSVs beside the sets.
    """
    found = []
    for path in map(Path, paths):
        if not path.is_dir():
            continue
        if (path / "test").is_dir():
            found.append(str(path))
        else:
            found += sorted(str(p) for p in path.iterdir() if (p / "test").is_dir())
    if not found:
        raise SystemExit(f"ablation: no wds/ evaluation set in {' '.join(paths)}")
    return found


def _table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r["metrics"]))
    head = "| variant | " + " | ".join(k.replace("image_retrieval_recall@", "t→i R@").replace(
        "/acc1", " acc1") for k in keys) + " | samples/s |"
    lines = [head, "|" + "---|" * (len(keys) + 2)]
    for name in VARIANTS:
        runs = [r for r in rows if r["variant"] == name]
        if not runs:
            continue
        cells = []
        for k in keys:
            values = [100 * r["metrics"][k] for r in runs if k in r["metrics"]]
            spread = f" ± {statistics.pstdev(values):.1f}" if len(values) > 1 else ""
            cells.append(f"{statistics.mean(values):.1f}{spread}" if values else "")
        speed = statistics.mean(r["samples_per_s"] for r in runs)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {speed:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="training shards")
    p.add_argument("--eval", required=True, nargs="+", help="wds/ evaluation sets, or a folder of them (synth's eval/)")
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
    args.eval = _sets(args.eval)  # before any training, so that a wrong path fails at once
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
