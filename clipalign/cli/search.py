"""clipalign search: text-to-image, image-to-image and image-to-text search over an index."""
from __future__ import annotations

import json
from pathlib import Path

from clipalign.cli.common import CliError, existing_path, parser


def build_parser():
    p = parser("search", "Search an index folder made by 'clipalign index'. Query by --text or by "
               "--image; results are ranked by cosine similarity. By default images are searched; "
               "--over captions searches the indexed captions instead (image-to-text with --image).")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="text query, e.g. 'a red circle'")
    query.add_argument("--image", help="path of a query image")
    p.add_argument("--index", required=True, help="index folder")
    p.add_argument("-k", type=int, default=10, help="number of results")
    p.add_argument("--over", choices=["images", "captions"], default="images", help="what to search")
    p.add_argument("--checkpoint", default=None, help="model for the query (default: the one the index was built with)")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    return p


def format_hits(hits: list[dict]) -> str:
    lines = [f"{'rank':>4}  {'score':>6}  {'key':<12}  caption  [path]"]
    for h in hits:
        lines.append(f"{h['rank']:>4}  {h['score']:6.3f}  {h['key']:<12}  {h['caption']}  [{h['source']}]")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    existing_path(args.index, "index")
    if args.image:
        existing_path(args.image, "query image")
    if args.k <= 0:
        raise CliError("-k must be positive")
    from PIL import Image, UnidentifiedImageError

    from clipalign.checkpoint import load_model
    from clipalign.embedding import text_features
    from retrieval.index import load_index

    try:
        index = load_index(args.index)
        model, transform, tokenizer, meta = load_model(args.checkpoint or Path(args.index) / index.info["checkpoint"])
    except (FileNotFoundError, ValueError) as err:
        raise CliError(str(err)) from None
    if meta["model_name"] != index.info["model"]:
        raise CliError(f"the index was built with model {index.info['model']!r}, the query model is {meta['model_name']!r}")
    if args.text is not None:
        query = text_features(model, tokenizer, [args.text])
    else:
        try:
            with Image.open(args.image) as img:
                image = transform(img.convert("RGB"))
        except (UnidentifiedImageError, OSError) as err:
            raise CliError(f"cannot read query image {args.image}: {err}") from None
        import torch

        with torch.no_grad():
            query = model.encode_image(image[None], normalize=True)
    target = "image" if args.over == "images" else "caption"
    try:
        hits = index.search(query.numpy(), args.k, target=target)[0]
    except (KeyError, ValueError) as err:
        raise CliError(str(err)) from None
    if args.json:
        print(json.dumps({"query": {"text": args.text, "image": args.image, "over": args.over}, "results": hits}, indent=2))
    else:
        print(format_hits(hits))
    return 0
