"""clipalign serve: an HTTP search API and web page over an index folder."""
from __future__ import annotations

import sys

from clipalign.cli.common import CliError, add_model_args, existing_path, model_source_of, parser


def build_parser():
    p = parser("serve", "Serve an index folder over HTTP: a search page at /, GET /search?text=...&k=..., "
               "POST /search with an image body, GET /health and thumbnails at /thumb/<row>. Binds to "
               "127.0.0.1 unless --host says otherwise. An upload over the size or pixel limit is refused "
               "before it is decoded, a few decode at once (the rest wait, then get 503), concurrent text "
               "queries are encoded together, idle connections are closed, a request that does not arrive "
               "whole within its deadline gets 408, and connections beyond the limit get 503 "
               "(retrieval/server.py).")
    p.add_argument("--index", required=True, help="index folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000, help="port (0 picks a free one)")
    add_model_args(p, checkpoint="model for the queries, checked against the index's (default: the index's own copy)")
    p.add_argument("--quiet", action="store_true", help="do not log each request")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    existing_path(args.index, "index")
    source = model_source_of(args, required=False)
    from retrieval.engine import open_engine
    from retrieval.server import make_server

    try:
        engine = open_engine(args.index, source, eager=True)
        server = make_server(engine, args.host, args.port, quiet=args.quiet)
    except (FileNotFoundError, KeyError, ValueError, OSError) as err:
        raise CliError(str(err)) from None
    host, port = server.server_address[:2]
    print(f"serving {engine.index.table.num_rows} images at http://{host}:{port}/  (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
