"""clipalign classify: zero-shot classification of your own images."""
from __future__ import annotations

import json
import sys

from clipalign.cli.common import CliError, add_model_args, existing_path, model_source_of, parser, read_templates


def build_parser():
    p = parser("classify", "Zero-shot classify images (files or folders, searched recursively) against "
               "class names, with a trained checkpoint or pretrained CLIP weights. Prints each image's top classes and "
               "probabilities; unreadable files (and anything that is not a regular file, such as "
               "a FIFO or a device) are counted and skipped.")
    p.add_argument("images", nargs="+", help="image files and/or folders")
    add_model_args(p)
    classes = p.add_mutually_exclusive_group(required=True)
    classes.add_argument("--classes", help="comma-separated class names, e.g. 'cat,dog,car'")
    classes.add_argument("--classes-file", help="file with one class name per line")
    p.add_argument("--templates-file", default=None,
                   help="prompt templates, one per line with {c} for the class (default: CLIP's simple templates)")
    p.add_argument("-k", "--top-k", type=int, default=3, help="classes shown per image")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def _lines(path: str, what: str) -> list[str]:
    lines = [line.strip() for line in existing_path(path, what).read_text().splitlines() if line.strip()]
    if not lines:
        raise CliError(f"{what} {path} is empty")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    classnames = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else \
        _lines(args.classes_file, "classes file")
    if len(classnames) < 2:
        raise CliError("give at least two class names")
    templates = read_templates(args.templates_file) if args.templates_file else None
    if args.top_k <= 0:
        raise CliError("--top-k must be positive")
    source = model_source_of(args)

    from clipalign.classify import DEFAULT_TEMPLATES, class_embeddings, classify_images, expand_images
    from clipalign.model_source import load_model_source

    paths = expand_images(args.images)
    if not paths:
        raise CliError("no images found in the given paths")
    try:
        model, transform, tokenizer, _ = load_model_source(source)
    except (FileNotFoundError, KeyError, ValueError) as err:
        raise CliError(str(err)) from None
    classifier = class_embeddings(model, tokenizer, classnames, templates or DEFAULT_TEMPLATES)
    results, skipped = classify_images(model, transform, classifier, classnames, paths, top_k=args.top_k,
                                       batch_size=args.batch_size, precision=args.precision)
    if not results:  # e.g. a FIFO or a device given as an image: counted as not_a_file, never opened
        raise CliError(f"none of the {len(paths)} image(s) could be read: {json.dumps(skipped)}")
    if args.json:
        print(json.dumps({"classes": classnames, "results": results, "skipped": skipped}, indent=2))
    else:
        for r in results:
            preds = "  ".join(f"{p['class']} {p['prob']:.1%}" for p in r["predictions"])
            print(f"{r['path']}: {preds}")
    if skipped:
        print(f"skipped {sum(skipped.values())} unreadable file(s): {json.dumps(skipped)}", file=sys.stderr)
    return 0
