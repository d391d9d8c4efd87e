"""clipalign index: embed the images (and captions) of shards into a FAISS index folder."""
from __future__ import annotations

import sys
from pathlib import Path

from clipalign.cli.common import CliError, existing_path, parser


def build_parser():
    p = parser("index", "Embed every image of a set of WebDataset shards, and its caption, with a trained "
               "checkpoint, and save exact inner-product FAISS indexes with the metadata "
               "(key, caption, source path) and a copy of the model weights into --out.")
    p.add_argument("--checkpoint", required=True, help="checkpoint file, or a run folder (its latest checkpoint)")
    p.add_argument("--data", required=True, help="shard folder, glob or brace pattern")
    p.add_argument("--out", required=True, help="index folder to write")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    existing_path(args.checkpoint, "checkpoint")
    from tqdm import tqdm

    from clipalign.checkpoint import load_model, save_checkpoint
    from clipalign.data import resolve_shards
    from retrieval.embed import embed_shards
    from retrieval.index import save_index

    shards = resolve_shards(args.data)
    if not shards:
        raise CliError(f"no shards found at {args.data}")
    try:
        model, transform, tokenizer, meta = load_model(args.checkpoint)
    except (FileNotFoundError, KeyError, ValueError) as err:
        raise CliError(str(err)) from None
    progress = None if args.no_progress else (lambda **kw: tqdm(desc="embedding", **kw))
    emb = embed_shards(model, transform, tokenizer, shards, batch_size=args.batch_size,
                       precision=args.precision, progress=progress)
    if not emb.metadata:
        raise CliError(f"no decodable images in {args.data}")
    # The index keeps its own copy of the weights: the run's checkpoint may be pruned later.
    info = {"model": meta["model_name"], "checkpoint": "model.pt", "source_checkpoint": meta["path"],
            "step": meta.get("step"), "shards": shards, "skipped": emb.skipped}
    index = save_index(args.out, {"image": emb.image.numpy(), "caption": emb.caption.numpy()}, emb.metadata, info)
    save_checkpoint(Path(args.out) / "model.pt",
                    {"model_name": meta["model_name"], "step": meta.get("step"), "model": model.state_dict()})
    skipped = f", skipped {sum(emb.skipped.values())} {emb.skipped}" if emb.skipped else ""
    print(f"indexed {index.info['count']} images (dim {index.dim}) into {args.out}{skipped}", file=sys.stderr)
    return 0
