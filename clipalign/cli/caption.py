"""clipalign caption: captions for your own images from a CoCa model's decoder."""
from __future__ import annotations

import json
import sys

from clipalign.cli.common import CliError, existing_path, parser


def build_parser():
    p = parser("caption", "Generate a caption for each image (files or folders, searched recursively) with a "
               "CoCa checkpoint trained with --caption-weight. Unreadable files are counted and skipped.")
    p.add_argument("images", nargs="+", help="image files and/or folders")
    p.add_argument("--checkpoint", required=True, help="checkpoint file, or a run folder (its latest checkpoint)")
    p.add_argument("--max-tokens", type=int, default=20, help="longest caption, in tokens")
    p.add_argument("--beams", type=int, default=1, help="beam search width (1: greedy)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_tokens < 1 or args.beams < 1 or args.batch_size < 1:
        raise CliError("--max-tokens, --beams and --batch-size must be positive")
    existing_path(args.checkpoint, "checkpoint")
    from clipalign.caption import caption_images
    from clipalign.checkpoint import load_model
    from clipalign.classify import expand_images

    paths = expand_images(args.images)
    if not paths:
        raise CliError("no images found in the given paths")
    model, transform, tokenizer, _ = load_model(args.checkpoint)
    try:
        results, skipped = caption_images(model, transform, tokenizer, paths, batch_size=args.batch_size,
                                          max_tokens=args.max_tokens, beams=args.beams)
    except ValueError as err:
        raise CliError(str(err)) from None
    if args.json:
        print(json.dumps({"results": results, "skipped": skipped}, indent=2))
    else:
        for r in results:
            print(f"{r['path']}: {r['caption']}")
    if skipped:
        print(f"skipped {sum(skipped.values())} unreadable file(s): {json.dumps(skipped)}", file=sys.stderr)
    return 0
