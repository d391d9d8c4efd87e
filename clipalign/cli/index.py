"""clipalign index: embeddings (or shards, embedded on the way) → a tuned FAISS index folder."""
from __future__ import annotations

import sys
from pathlib import Path

from clipalign.cli.common import (CliError, add_engine_args, add_model_args, add_progress_arg, engine_options, existing_path,
                                  model_source_of, parser)


def build_parser():
    from clipalign.formats.folders import IndexFolder

    p = parser("index", "Build a FAISS index folder from an embeddings folder made by 'clipalign embed' "
               "(or, with a model (--checkpoint, or --model and --pretrained) and --data, embed the images first). With --index auto the index "
               "type is chosen from the number of vectors and --max-memory, trained on a sample, and its "
               "search parameter tuned on held-out queries to --target-recall@10 against exact search; "
               f"measured recall, latency and memory go into {IndexFolder('').info.name}.")
    p.add_argument("--embeddings", help="embeddings folder from 'clipalign embed'")
    add_model_args(p, checkpoint="one-step mode: checkpoint (or run folder) to embed --data with")
    p.add_argument("--data", help="one-step mode: shard folder, glob or brace pattern, or an image folder")
    p.add_argument("--out", required=True, help="index folder to write")
    p.add_argument("--index", choices=["auto", "flat", "hnsw", "ivf", "ivfsq8", "ivfpq", "ivfpqfs"], default="auto")
    p.add_argument("--max-memory", default="4G", help="memory budget of the index files together (e.g. 1G, 512M)")
    p.add_argument("--target-recall", type=float, default=0.95, help="recall@10 to tune the search parameter to")
    p.add_argument("--add", action="store_true", help="append the embeddings to the existing index at --out "
                   "(rows whose key it already holds are skipped: adding twice adds once)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="fp32",
                   help="of the model's pass: bf16 is 2-3x faster where the CPU runs it natively (AMX, AVX-512 "
                   "BF16), vectors within ~1e-2 of fp32's; 'auto' picks it there, else fp32")
    add_progress_arg(p)
    add_engine_args(p, "embed with a pool of Ray actors and fill the index's parts as Ray tasks, merged here; "
                       "the same folder 'local' writes", embeds=True)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    source = model_source_of(args, required=False)
    if (source is None) == (args.embeddings is None):
        raise CliError("give --embeddings EMB, or a model (--checkpoint RUN, or --model NAME --pretrained FILE, "
                       "or --pretrained HF_FOLDER) and --data to embed: one of the two")
    if source is None:
        existing_path(args.embeddings, "embeddings folder")
    if not 0 < args.target_recall <= 1:
        raise CliError("--target-recall must be in (0, 1]")
    from retrieval.choose import parse_memory

    try:
        budget = parse_memory(args.max_memory)
    except ValueError as err:
        raise CliError(str(err)) from None
    if source is not None and not args.data:
        raise CliError("a model needs --data to embed (or give --embeddings)")
    engine = engine_options(args)
    from retrieval.build import add_to_index_folder, build_index_folder, index_images

    options = {"kind": args.index, "max_memory": budget, "target_recall": args.target_recall, "seed": args.seed}
    skipped = 0
    try:
        if source is not None:
            from tqdm import tqdm

            index, count, skipped = index_images(source, args.data, args.out, add=args.add,
                                                 batch_size=args.batch_size, precision=args.precision,
                                                 progress=None if args.no_progress else tqdm, **engine, **options)
        elif args.add:  # an append runs here whatever the engine
            index, count, skipped = add_to_index_folder(args.embeddings, args.out)
        else:
            where = {"engine": engine["engine"], "ray_address": engine["ray_address"]}  # nothing to embed
            index, count = build_index_folder(args.embeddings, args.out, **where, **options)
    except (FileNotFoundError, KeyError, ValueError, ConnectionError) as err:
        raise CliError(str(err).strip("'\"")) from None
    out = Path(args.out)
    if args.add:
        already = f" (skipped {skipped} already in the index)" if skipped else ""
        print(f"added {count} vectors to {out}: now {index.info['count']}{already}", file=sys.stderr)
        return 0
    for target, s in index.info["indexes"].items():
        print(f"{target}: {s['factory']} {s['search_param'] or ''} recall@{s['k']} {s['recall@' + str(s['k'])]:.3f} "
              f"({'reached' if s['target_reached'] else 'BELOW'} target {s['target_recall']}), "
              f"{s['memory_bytes'] / 2**20:.1f} MiB", file=sys.stderr)
    slow = [kind for kind in ("text", "image") if not index.info.get(f"{kind}_query")]
    note = f" (no fast {' or '.join(slow)}-query path for this model: those searches load the full model)" if slow else ""
    print(f"indexed {index.info['count']} vectors (dim {index.dim}) into {out}{note}", file=sys.stderr)
    return 0
