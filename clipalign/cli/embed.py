"""clipalign embed: images (and captions) of shards or an image folder → chunked embedding files."""
from __future__ import annotations

import sys

from clipalign.cli.common import CliError, existing_path, parser


def build_parser():
    p = parser("embed", "Embed every image of a set of WebDataset shards or of an image folder (and its caption: "
               "the shard's .txt, or a .txt file beside the image) with a trained checkpoint. Writes one "
               ".npy chunk of vectors and one Parquet metadata table (key, caption, source, shard, offset) per "
               "shard or per --per-chunk images, and a copy of the weights. Re-running the same command "
               "resumes after the last finished chunk; unreadable images are counted and skipped.")
    p.add_argument("--checkpoint", required=True, help="checkpoint file, or a run folder (its latest checkpoint)")
    p.add_argument("--data", required=True, help="shard folder, glob or brace pattern, or a folder of images")
    p.add_argument("--out", required=True, help="embeddings folder to write (or resume)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="storage type of the vectors")
    p.add_argument("--no-captions", action="store_true", help="embed images only")
    p.add_argument("--per-chunk", type=int, default=10_000, help="images per chunk for an image folder")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--no-progress", action="store_true")
    return p


def resolve_units(data: str, per_chunk: int):
    """Shards at ``data``, else the images of the folder ``data``, as embedding units."""
    from pathlib import Path

    from clipalign.data import resolve_shards
    from retrieval.sources import folder_units, shard_units

    shards = resolve_shards(data)
    if shards:
        return shard_units(shards)
    if Path(data).is_dir():
        units = folder_units(data, per_chunk)
        if units:
            return units
    raise CliError(f"no shards and no images found at {data}")


def embed_to(args, out: str):
    """Run the embedding of ``args.data`` into ``out``; returns ``(summary, model meta)``."""
    from tqdm import tqdm

    from clipalign.checkpoint import load_model, save_checkpoint
    from retrieval.embed import embed_collection
    from retrieval.identity import model_identity

    existing_path(args.checkpoint, "checkpoint")
    units = resolve_units(args.data, args.per_chunk)
    try:
        model, transform, tokenizer, meta = load_model(args.checkpoint)
    except (FileNotFoundError, KeyError, ValueError) as err:
        raise CliError(str(err)) from None
    identity = meta.get("model_identity") or model_identity(meta["model_name"], model.state_dict())
    bar = None if args.no_progress else tqdm(desc="embedding", unit="img")
    try:
        summary = embed_collection(model, transform, tokenizer, units, out, identity=identity,
                                   captions=not args.no_captions, dtype=args.dtype, batch_size=args.batch_size,
                                   precision=args.precision, on_batch=bar.update if bar is not None else None)
    except ValueError as err:
        raise CliError(str(err)) from None
    finally:
        if bar is not None:
            bar.close()
    from pathlib import Path

    # The vectors travel with the weights that made them: queries must use the same model.
    save_checkpoint(Path(out) / "model.pt", {"model_name": meta["model_name"], "step": meta.get("step"),
                                             "model_identity": identity, "source_checkpoint": meta["path"],
                                             "model": model.state_dict()})
    return summary, meta


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    summary, _ = embed_to(args, args.out)
    if not summary["count"]:
        raise CliError(f"no decodable images in {args.data}")
    skipped = f", skipped {sum(summary['skipped'].values())} {summary['skipped']}" if summary["skipped"] else ""
    print(f"embedded {summary['count']} images in {summary['units']} chunks into {args.out}{skipped}", file=sys.stderr)
    return 0
