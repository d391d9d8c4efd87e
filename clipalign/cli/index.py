"""clipalign index: embeddings (or shards, embedded on the way) → a tuned FAISS index folder."""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from clipalign.cli.common import CliError, existing_path, parser


def build_parser():
    p = parser("index", "Build a FAISS index folder from an embeddings folder made by 'clipalign embed' "
               "(or, with --checkpoint and --data, embed the shards first). With --index auto the index "
               "type is chosen from the number of vectors and --max-memory, trained on a sample, and its "
               "search parameter tuned on held-out queries to --target-recall@10 against exact search; "
               "measured recall, latency and memory go into info.json.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--embeddings", help="embeddings folder from 'clipalign embed'")
    src.add_argument("--checkpoint", help="one-step mode: checkpoint (or run folder) to embed --data with")
    p.add_argument("--data", help="one-step mode: shard folder, glob or brace pattern, or an image folder")
    p.add_argument("--out", required=True, help="index folder to write")
    p.add_argument("--index", choices=["auto", "flat", "hnsw", "ivf", "ivfsq8", "ivfpq", "ivfpqfs"], default="auto")
    p.add_argument("--max-memory", default="4G", help="memory budget of the index files together (e.g. 1G, 512M)")
    p.add_argument("--target-recall", type=float, default=0.95, help="recall@10 to tune the search parameter to")
    p.add_argument("--add", action="store_true", help="append the embeddings to the existing index at --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--no-progress", action="store_true")
    return p


def _one_step_embed(args, tmp: str) -> str:
    from clipalign.cli.embed import embed_to

    if not args.data:
        raise CliError("--checkpoint needs --data (or give --embeddings)")
    args.dtype, args.no_captions, args.per_chunk = "float32", False, 10_000
    summary, _ = embed_to(args, tmp)
    if not summary["count"]:
        raise CliError(f"no decodable images in {args.data}")
    return tmp


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.checkpoint:
        existing_path(args.checkpoint, "checkpoint")
    else:
        existing_path(args.embeddings, "embeddings folder")
    if not 0 < args.target_recall <= 1:
        raise CliError("--target-recall must be in (0, 1]")
    from retrieval.choose import parse_memory

    try:
        budget = parse_memory(args.max_memory)
    except ValueError as err:
        raise CliError(str(err)) from None
    with tempfile.TemporaryDirectory(prefix="clipalign-embed-") as tmp:
        folder = _one_step_embed(args, tmp) if args.checkpoint else args.embeddings
        return _index(args, Path(folder), budget)


def _index(args, folder: Path, budget: int) -> int:
    from retrieval.embed import load_embeddings, summary
    from retrieval.index import add_to_index, load_index, save_index

    try:
        vectors, rows, emb_info = load_embeddings(folder)
    except (FileNotFoundError, ValueError) as err:
        raise CliError(str(err)) from None
    out = Path(args.out)
    if args.add:
        try:
            old = load_index(out, mmap=True)
            old.check_model(emb_info["model"], emb_info["dim"])
            index = add_to_index(out, {t: vectors[t] for t in old.indexes if t in vectors}, rows)
        except (FileNotFoundError, KeyError, ValueError) as err:
            raise CliError(str(err)) from None
        print(f"added {len(rows)} vectors to {out}: now {index.info['count']}", file=sys.stderr)
        return 0
    if len(rows) < 2:
        raise CliError(f"{folder} holds {len(rows)} vectors; an index needs at least 2")
    info = {"model": emb_info["model"]["name"], "model_identity": emb_info["model"], "checkpoint": "model.pt",
            "embeddings": str(folder.resolve()) if not args.checkpoint else None,
            "skipped": summary(folder)["skipped"]}
    try:
        index = save_index(out, vectors, rows, info, kind=args.index, max_memory=budget,
                           target_recall=args.target_recall, seed=args.seed)
    except ValueError as err:
        raise CliError(str(err)) from None
    shutil.copyfile(folder / "model.pt", out / "model.pt")
    from retrieval.query_encoder import attach_text_query

    fast = attach_text_query(out)
    for target, s in index.info["indexes"].items():
        print(f"{target}: {s['factory']} {s['search_param'] or ''} recall@{s['k']} {s['recall@' + str(s['k'])]:.3f} "
              f"({'reached' if s['target_reached'] else 'BELOW'} target {s['target_recall']}), "
              f"{s['memory_bytes'] / 2**20:.1f} MiB", file=sys.stderr)
    print(f"indexed {index.info['count']} vectors (dim {index.dim}) into {out}"
          f"{'' if fast else ' (no fast text-query path for this model: text searches load the full model)'}", file=sys.stderr)
    return 0
