"""clipalign embed: images (and captions) of shards or an image folder → chunked embedding files."""
from __future__ import annotations

import sys

from clipalign.cli.common import (CliError, add_engine_args, add_model_args, add_progress_arg, engine_options,
                                  model_source_of, parser)


def build_parser():
    p = parser("embed", "Embed every image of a set of WebDataset shards or of an image folder (and its caption: "
               "the shard's .txt, or a .txt file beside the image) with a trained checkpoint or pretrained CLIP weights. Writes one "
               ".npy chunk of vectors and one Parquet metadata table (key, caption, source, shard, offset) per "
               "shard or per --per-chunk images, and a copy of the weights. Re-running the same command "
               "resumes after the last finished chunk; unreadable images are counted and skipped.")
    add_model_args(p)
    p.add_argument("--data", required=True, help="shard folder, glob or brace pattern, or a folder of images")
    p.add_argument("--out", required=True, help="embeddings folder to write (or resume)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="storage type of the vectors")
    p.add_argument("--no-captions", action="store_true", help="embed images only")
    p.add_argument("--per-chunk", type=int, default=10_000, help="images per chunk for an image folder")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="fp32",
                   help="of the model's pass: bf16 is 2-3x faster where the CPU runs it natively (AMX, AVX-512 "
                   "BF16), vectors within ~1e-2 of fp32's; 'auto' picks it there, else fp32")
    p.add_argument("--exact-decode", action="store_true",
                   help="decode every JPEG whole, as the model's own preprocessing does; by default a JPEG of "
                   "more than twice the model's input size is decoded at 1/2, 1/4 or 1/8 scale (1.5-2x faster "
                   "to decode, vectors within ~1e-3)")
    add_progress_arg(p)
    add_engine_args(p, "embed with a pool of Ray actors, one model each; the same folder 'local' writes", embeds=True)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    source = model_source_of(args)
    engine = engine_options(args)
    from tqdm import tqdm

    from retrieval.embed import embed_folder

    try:
        summary = embed_folder(source, args.data, args.out, captions=not args.no_captions, dtype=args.dtype,
                               per_chunk=args.per_chunk, batch_size=args.batch_size, precision=args.precision,
                               exact_decode=args.exact_decode, progress=None if args.no_progress else tqdm, **engine)
    except (FileNotFoundError, KeyError, ValueError, ConnectionError) as err:
        raise CliError(str(err)) from None
    if not summary["count"]:
        raise CliError(f"no decodable images in {args.data}")
    skipped = f", skipped {sum(summary['skipped'].values())} {summary['skipped']}" if summary["skipped"] else ""
    print(f"embedded {summary['count']} images in {summary['units']} chunks into {args.out}{skipped}", file=sys.stderr)
    return 0
