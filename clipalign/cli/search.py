"""clipalign search: text-to-image, image-to-image and image-to-text search over an index."""
from __future__ import annotations

import json
import sys

from clipalign.cli.common import CliError, add_model_args, existing_path, model_source_of, parser


def build_parser():
    p = parser("search", "Search an index folder made by 'clipalign index'. Query by --text, by --image, or "
               "by a --queries file (one text query per line); results are ranked by cosine similarity. By "
               "default images are searched; --over captions searches the indexed captions instead "
               "(image-to-text with --image).")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="text query, e.g. 'a red circle'")
    query.add_argument("--image", help="path of a query image")
    query.add_argument("--queries", help="file of text queries, one a line (a regular file: not a pipe)")
    p.add_argument("--index", required=True, help="index folder")
    p.add_argument("-k", type=int, default=10, help="number of results (at most 100; at most the index's size)")
    p.add_argument("--over", choices=["images", "captions"], default="images", help="what to search")
    add_model_args(p, checkpoint="model for the queries, checked against the index's (default: the index's own copy)")
    p.add_argument("--json", action="store_true", help="print results as JSON (one object a line with --queries)")
    p.add_argument("--html", default=None, help="also write a self-contained results page with thumbnails here")
    return p


def format_hits(hits: list[dict]) -> str:
    lines = [f"{'rank':>4}  {'cosine':>6}  {'key':<12}  caption  [path]"]
    for h in hits:
        lines.append(f"{h['rank']:>4}  {h['score']:6.3f}  {h['key']:<12}  {h['caption']}  [{h['source']}]")
    return "\n".join(lines)


def _regular_file(path: str, what: str) -> str:
    """``path``, if it names a regular file; else ``CliError`` (a FIFO would hang the read, a
    directory or device gives no query)."""
    from clipalign.formats.images import is_regular_file

    if not is_regular_file(existing_path(path, what)):
        raise CliError(f"{what} {path} is not a regular file")
    return path


def _read_regular_file(path: str, what: str) -> bytes:
    """The bytes of the regular file ``path`` (opened so that a FIFO swapped in cannot hang it)."""
    from clipalign.formats.images import open_regular_file
    from clipalign.formats.skips import BadSample

    try:
        with open_regular_file(_regular_file(path, what)) as f:
            return f.read()
    except BadSample:
        raise CliError(f"{what} {path} is not a readable regular file") from None


def _queries(args) -> list[str]:
    from retrieval.engine import MAX_TEXT

    if args.queries is None:
        if not args.text.strip():
            raise CliError("give a non-empty --text query")
        if len(args.text.strip()) > MAX_TEXT:
            raise CliError(f"text queries are limited to {MAX_TEXT} characters")
        return [args.text.strip()]
    lines = _read_regular_file(args.queries, "queries file").decode("utf-8", errors="replace").splitlines()
    long = next((n for n, t in enumerate(lines, 1) if len(t.strip()) > MAX_TEXT), None)
    if long is not None:
        raise CliError(f"{args.queries}: line {long} has {len(lines[long - 1].strip())} characters; "
                       f"text queries are limited to {MAX_TEXT}")
    texts = [t.strip() for t in lines if t.strip()]
    if not texts:
        raise CliError(f"{args.queries} holds no queries")
    return texts


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    existing_path(args.index, "index")
    if args.image:
        _regular_file(args.image, "query image")
    from retrieval.engine import MAX_K

    if not 1 <= args.k <= MAX_K:  # as the server bounds it; more than the index holds gives all it holds
        raise CliError(f"-k must be between 1 and {MAX_K}")
    texts = None if args.image else _queries(args)
    source = model_source_of(args, required=False)
    from retrieval.engine import open_engine

    try:
        engine = open_engine(args.index, source)
    except (FileNotFoundError, KeyError, ValueError) as err:
        raise CliError(str(err)) from None
    try:
        if texts is not None:
            all_hits = engine.search_texts(texts, args.k, args.over)
            labels = texts
        else:
            all_hits = engine.search_image_file(args.image, args.k, args.over)
            labels = [args.image]
    except (KeyError, ValueError) as err:
        raise CliError(str(err).strip("'\"")) from None
    for label, hits in zip(labels, all_hits):
        query = {"text": label, "image": None} if texts is not None else {"text": None, "image": label}
        if args.json:
            print(json.dumps({"query": {**query, "over": args.over}, "results": hits},
                             indent=None if args.queries else 2))
        else:
            if len(labels) > 1:
                print(f"\n# {label}")
            print(format_hits(hits))
    if args.html:
        from retrieval.html import write_results_page

        write_results_page(args.html, list(zip(labels, all_hits)))
        print(f"wrote {args.html}", file=sys.stderr)
    return 0
