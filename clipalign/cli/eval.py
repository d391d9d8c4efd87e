"""clipalign eval: zero-shot classification and retrieval on CLIP_benchmark wds/ sets."""
from __future__ import annotations

import json
import math
from pathlib import Path

from clipalign.formats.atomic import write_json
from clipalign.cli.common import CliError, add_model_args, existing_path, model_source_of, parser, read_templates


def build_parser():
    p = parser("eval", "Evaluate a checkpoint or pretrained CLIP weights on evaluation sets: CLIP_benchmark wds/ sets (zero-shot "
               "classification or retrieval, by each set's dataset_type.txt), ImageFolder trees "
               "(class = sub-folder) or CSV/TSV/JSONL manifests with image and label columns "
               "(zero-shot classification). Metrics use CLIP_benchmark's names and definitions.")
    add_model_args(p)
    p.add_argument("--data", required=True, nargs="+", help="wds/ set folders, ImageFolder folders or label manifests")
    p.add_argument("--templates-file", default=None,
                   help="zero-shot prompt templates, one per line with {c} for the class (default: the set's own, "
                        "else CLIP's simple templates)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--recall-k", type=int, nargs="+", default=[1, 5, 10], help="k values of retrieval recall@k")
    p.add_argument("--image-col", default="image", help="image column of label manifests")
    p.add_argument("--label-col", default="label", help="label column of label manifests")
    p.add_argument("--linear-probe", action="store_true",
                   help="also fit a logistic-regression probe on the frozen image features of each classification "
                        "set's train/ split and report it on the test/ split")
    p.add_argument("--plot", default=None, metavar="DIR",
                   help="write each classification set's confusion matrix as DIR/<set>_confusion.png")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--no-progress", action="store_true")
    return p


def format_table(results: dict[str, dict]) -> str:
    """One line per set: its metrics, then chance for classification."""
    rows = []
    width = max(map(len, results)) if results else 0
    for name, r in results.items():
        m = r["metrics"]
        if "mean_average_precision" in m:
            cells = f"mAP {m['mean_average_precision']:6.1%}  (multi-label, n={r['n']})"
        elif r["task"] == "zeroshot_classification":
            acc5 = "   n/a" if math.isnan(m["acc5"]) else f"{m['acc5']:6.1%}"
            cells = f"acc@1 {m['acc1']:6.1%}  acc@5 {acc5}  mean/class {m['mean_per_class_recall']:6.1%}" \
                    f"  (chance {r['chance_acc1']:.1%}, n={r['n']})"
            if "linear_probe" in r:
                cells += f"  linear probe acc@1 {r['linear_probe']['metrics']['acc1']:6.1%}"
        else:
            ks = [int(k.rsplit("@", 1)[1]) for k in m if k.startswith("image_retrieval_recall@")]
            cells = "  ".join(
                f"{d}@{k} {m[f'{key}_retrieval_recall@{k}']:6.1%}"
                for key, d in (("image", "t2i"), ("text", "i2t")) for k in ks
            ) + f"  (n={r['n']})"
        skipped = f"  skipped {sum(r['skipped'].values())}" if r["skipped"] else ""
        rows.append(f"{name:<{width}}  {cells}{skipped}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if any(k <= 0 for k in args.recall_k):
        raise CliError("--recall-k values must be positive")
    source = model_source_of(args)
    roots = [existing_path(d, "evaluation set") for d in args.data]
    from tqdm import tqdm

    from clipalign.evaluate import evaluate, probe_train_split
    from clipalign.model_source import load_model_source
    from data_prep.eval_source import open_eval_source

    templates = read_templates(args.templates_file) if args.templates_file else None
    try:
        sets = [open_eval_source(r, templates=templates, image_col=args.image_col, label_col=args.label_col) for r in roots]
        model, transform, tokenizer, meta = load_model_source(source)
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise CliError(str(err)) from None
    results = {}
    for name, s in zip(_unique_names(sets), sets):
        progress = None if args.no_progress else (lambda **kw: tqdm(desc=name, leave=False, **kw))
        options = {"ks": tuple(args.recall_k)} if s.task == "retrieval" else {}
        if args.linear_probe and (train := probe_train_split(s)) is not None:
            options["probe_train"] = train
        try:
            result = evaluate(model, tokenizer, transform, s, batch_size=args.batch_size,
                              precision=args.precision, progress=progress, **options)
        except ValueError as err:
            raise CliError(str(err)) from None
        if "linear_probe" in result:  # CLIP_benchmark's linear-probe metric names
            result["metrics"].update({f"lp_{k}": v for k, v in result["linear_probe"]["metrics"].items()})
        dataset = f"wds/{s.name}" if s.items is None else s.name  # CLIP_benchmark's result-file keys
        results[name] = {"dataset": dataset, "model": meta["model_name"], "pretrained": meta["path"],
                         "language": "en", **result, "path": str(s.root)}
    report = {"checkpoint": meta["path"], "model": meta["model_name"], "step": meta.get("step"), "results": results}
    if args.out:
        write_json(args.out, report)  # before any plot: a failed figure never costs the numbers
    if args.plot:
        from clipalign.plots import confusion_matrix_png

        for name, r in results.items():
            if "confusion_matrix" in r:
                r["confusion_png"] = str(confusion_matrix_png(r["confusion_matrix"], r["classnames"],
                                                              Path(args.plot) / f"{name}_confusion.png", title=name))
        if args.out:
            write_json(args.out, report)
    print(json.dumps(report, indent=2) if args.json else format_table(results))
    return 0


def _unique_names(sets: list) -> list[str]:
    """Each set's folder name, prefixed by its parent's where two sets share one (a/val, b/val)."""
    names = [s.name for s in sets]
    return [f"{s.root.parent.name}/{s.name}" if names.count(s.name) > 1 else s.name for s in sets]
