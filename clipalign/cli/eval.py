"""clipalign eval: zero-shot classification and retrieval on CLIP_benchmark wds/ sets."""
from __future__ import annotations

import json

from clipalign.cli.common import (CliError, add_model_args, add_progress_arg, existing_path, model_source_of, parser,
                                  read_templates)


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
    add_progress_arg(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if any(k <= 0 for k in args.recall_k):
        raise CliError("--recall-k values must be positive")
    source = model_source_of(args)
    roots = [existing_path(d, "evaluation set") for d in args.data]
    from tqdm import tqdm

    from clipalign.eval_report import eval_report, report_table
    from clipalign.model_source import load_model_source
    from data_prep.eval_source import open_eval_source

    templates = read_templates(args.templates_file) if args.templates_file else None
    try:
        sets = [open_eval_source(r, templates=templates, image_col=args.image_col, label_col=args.label_col) for r in roots]
        model, transform, tokenizer, meta = load_model_source(source)
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise CliError(str(err)) from None
    progress = None if args.no_progress else (lambda name: lambda **kw: tqdm(desc=name, leave=False, **kw))
    try:
        report = eval_report(model, tokenizer, transform, meta, sets, out=args.out, plot_dir=args.plot,
                             batch_size=args.batch_size, precision=args.precision, ks=args.recall_k,
                             linear_probe=args.linear_probe, progress=progress)
    except ValueError as err:
        raise CliError(str(err)) from None
    print(json.dumps(report, indent=2) if args.json else report_table(report))
    return 0
