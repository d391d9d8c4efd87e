"""``clipalign prep``: turn an image-caption manifest or folder into WebDataset shards."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from clipalign.cli.common import (CliError, add_engine_args, add_progress_arg, default_workers, engine_options,
                                  existing_path, parser, read_templates)

if TYPE_CHECKING:
    from data_prep.prep import PrepConfig


def build_parser() -> argparse.ArgumentParser:
    from data_prep.fetch import DEFAULT_USER_AGENT
    from clipalign.formats.images import DEFAULT_MAX_PIXELS

    p = parser("prep", "Read a manifest (.csv/.tsv/.jsonl/.parquet, each optionally .gz; image column holding local "
               "paths relative to the manifest's folder, file:// or http(s):// URLs), a COCO captions .json, or a "
               "folder of images with same-stem .txt captions, and write WebDataset shards DIR/00000.tar, ... "
               "(shard i = input rows [i*S, (i+1)*S)) with NNNNN.parquet and NNNNN_stats.json beside each, plus "
               "stats.json, sizes.json and errors.jsonl. Bad samples are skipped and listed with their reason. "
               "Re-running the same command resumes: complete shards are kept. See docs/prep.md.")
    p.add_argument("input", help="manifest file, COCO captions .json, or folder of images + .txt captions")
    p.add_argument("--out", required=True, help="output folder for the shards")
    g = p.add_argument_group("input")
    g.add_argument("--image-col", default="image", help="manifest column holding image paths or URLs")
    g.add_argument("--caption-col", default="caption", help="manifest column holding captions")
    g.add_argument("--extra-cols", default="all",
                   help="other manifest columns to carry into each sample's json: 'all', 'none' or a comma list")
    g.add_argument("--caption-mode", default="all", choices=["all", "first", "each"],
                   help="COCO: one sample per image with all captions (one per line in txt), with the first, "
                        "or one sample per caption")
    g.add_argument("--image-root", default=None, help="COCO: folder of the images (default: the json's folder)")
    g = p.add_argument_group("images and captions")
    g.add_argument("--image-size", type=int, default=256, help="target image side in pixels")
    g.add_argument("--resize-mode", default="center_crop", choices=["center_crop", "keep_ratio", "border", "no"],
                   help="img2dataset semantics")
    g.add_argument("--format", default="jpg", choices=["jpg", "webp", "png"], help="image encoding in the shards")
    g.add_argument("--quality", type=int, default=95, help="jpg/webp quality")
    g.add_argument("--background", default="255,255,255",
                   help="R,G,B colour that transparency and border padding become")
    g.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="skip images with more pixels than this, before decoding (decompression bombs)")
    g.add_argument("--min-image-size", type=int, default=0, help="skip images whose smaller side is below this")
    g.add_argument("--max-aspect-ratio", type=float, default=None, help="skip images whose long/short side ratio exceeds this")
    g.add_argument("--max-caption-length", type=int, default=None, help="skip captions longer than this (characters)")
    g.add_argument("--dedup", action="store_true", help="drop images whose bytes (SHA-256) equal an earlier sample's")
    g.add_argument("--tokenize", default=None, metavar="MODEL",
                   help="also store each caption's token ids (tok.npy) for this open_clip/clipalign model")
    g = p.add_argument_group("downloads (http/https URLs)")
    g.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    g.add_argument("--retries", type=int, default=2, help="retries after connection errors, HTTP 429 and 5xx")
    g.add_argument("--max-download-mb", type=float, default=32.0, help="largest image accepted, in MiB")
    g.add_argument("--user-agent", default=DEFAULT_USER_AGENT, help="User-Agent header")
    g.add_argument("--ignore-robots", action="store_true",
                   help="download even when X-Robots-Tag says noai/noimageai")
    g.add_argument("--ignore-content-type", action="store_true", help="accept any Content-Type")
    g = p.add_argument_group("sharding")
    g.add_argument("--shard-size", type=int, default=10_000,
                   help="input rows per shard (skipped rows leave a shard with fewer samples)")
    g.add_argument("--workers", type=int, default=default_workers(),
                   help="processes (shards do not depend on it; default: the usable cores, at most 8)")
    g.add_argument("--threads", type=int, default=4, help="images each process reads or downloads at once (use many for URLs); "
                        "decoding runs on each process's share of the cores")
    g.add_argument("--overwrite", action="store_true", help="delete what --out holds and start afresh")
    g.add_argument("--retry-failed", action="store_true",
                   help="fetch again only the rows of complete shards that failed for a reason that may pass "
                        "(connection errors, timeouts, truncated bodies, HTTP 429 and 5xx) and rewrite just their "
                        "shards; other shards stay as they are, incomplete ones are built")
    add_engine_args(p, "one Ray task per shard, retried where its worker dies (--workers is then unused); "
                       "the same files 'local' writes")
    g = p.add_argument_group("evaluation sets")
    g.add_argument("--eval-set", choices=["classification", "retrieval"], default=None,
                   help="write an evaluation set in CLIP_benchmark's wds/ layout instead of training shards: "
                        "classification from an ImageFolder tree or an (image, label) manifest, retrieval from "
                        "an (image, caption) manifest (rows of one image give it several captions)")
    g.add_argument("--split", default="test", help="split folder of --eval-set (test, or train for linear probes)")
    g.add_argument("--label-col", default="label", help="manifest column holding class labels (--eval-set classification)")
    g.add_argument("--templates-file", default=None,
                   help="prompt templates for --eval-set classification, one per line with {c} (default: CLIP's simple ones)")
    add_progress_arg(p)
    return p


def _eval_set(args: argparse.Namespace, source: Path) -> int:
    from clipalign.formats.evalset import is_eval_set
    from data_prep.evalprep import classification_set, retrieval_set
    from data_prep.records import ManifestError

    out = Path(args.out)
    if is_eval_set(out, args.split) and not args.overwrite:
        raise CliError(f"{out} already holds an evaluation set; pass --overwrite to replace it")
    options = dict(split=args.split, image_size=args.image_size, resize_mode=args.resize_mode,
                   image_format=args.format, quality=args.quality)
    try:
        if args.eval_set == "classification":
            if args.templates_file:
                templates = read_templates(args.templates_file)
            else:
                from clipalign.classify import DEFAULT_TEMPLATES as templates
            stats = classification_set(source, out, templates, image_col=args.image_col, label_col=args.label_col,
                                       **options)
        else:
            stats = retrieval_set(source, out, image_col=args.image_col, caption_col=args.caption_col, **options)
    except (ManifestError, ValueError) as err:
        raise CliError(str(err)) from None
    skipped = ", ".join(f"{k}: {v}" for k, v in stats["skipped"].items()) or "none"
    print(f"prep: wrote a {stats['task']} set of {stats['written']} images to {out} (skipped: {skipped})")
    return 0


def _background(text: str) -> tuple[int, ...]:
    parts = text.lstrip("#")
    try:
        if "," not in text and len(parts) == 6:
            return tuple(int(parts[i : i + 2], 16) for i in (0, 2, 4))
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise CliError(f"--background must be R,G,B (0..255) or #rrggbb, got {text!r}") from None


def _extra_cols(text: str) -> list[str] | None:
    if text == "all":
        return None
    return [] if text == "none" else [c.strip() for c in text.split(",") if c.strip()]


def _config(args: argparse.Namespace) -> "PrepConfig":
    """The options as a ``PrepConfig``, which checks them (``CliError`` naming a bad one)."""
    from data_prep.fetch import FetchConfig
    from data_prep.prep import PrepConfig
    from data_prep.sample import SampleConfig

    try:
        fetch = FetchConfig(
            timeout=args.timeout, retries=args.retries, max_bytes=int(args.max_download_mb * 2**20),
            user_agent=args.user_agent, check_content_type=not args.ignore_content_type,
            respect_robots=not args.ignore_robots,
        )
        sample = SampleConfig(
            image_size=args.image_size, resize_mode=args.resize_mode, image_format=args.format, quality=args.quality,
            background=_background(args.background), max_pixels=args.max_pixels, min_image_size=args.min_image_size,
            max_aspect_ratio=args.max_aspect_ratio, max_caption_length=args.max_caption_length,
            tokenize=args.tokenize, fetch=fetch,
        )
        return PrepConfig(sample=sample, shard_size=args.shard_size, workers=args.workers, threads=args.threads,
                          dedup=args.dedup)
    except ValueError as err:
        raise CliError(str(err)) from None


def _summary(stats: dict) -> str:
    reasons = ", ".join(f"{k}: {v}" for k, v in stats["skipped_by_reason"].items())
    skipped = f"skipped {stats['skipped']}" + (f" ({reasons})" if reasons else "")
    if stats.get("resumed_shards"):
        skipped += f", kept {stats['resumed_shards']} complete shard(s) of an earlier run"
    if stats.get("retried_rows"):
        skipped += f", fetched {stats['retried_rows']} failed row(s) again"
    return (f"prep: wrote {stats['written']} samples in {stats['shards']} shard(s) to {stats['output']}, "
            f"{skipped} [{stats['duration_s']:.1f} s, {stats['samples_per_s'] or 0:.0f} samples/s]")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    source = existing_path(args.input, "input")
    config = _config(args)  # checks every option, those of --eval-set too
    engine = engine_options(args)
    if args.eval_set:
        return _eval_set(args, source)

    from tqdm import tqdm

    from data_prep.manifest import Manifest, ManifestError
    from clipalign.memory import keep_freed_memory
    from data_prep.prep import ResumeMismatch, WorkerDied, run_prep
    from data_prep.ray_prep import ClusterError
    from data_prep.splits import prep_input

    extra_cols = _extra_cols(args.extra_cols)
    manifest = Manifest(source, image_col=args.image_col, caption_col=args.caption_col,
                        extra_cols=None if extra_cols is None else tuple(extra_cols), caption_mode=args.caption_mode,
                        image_root=None if args.image_root is None else Path(args.image_root))
    try:  # opened here, so that a bad header fails before --overwrite deletes anything
        records = prep_input(manifest, engine["engine"])
    except ManifestError as err:
        raise CliError(str(err)) from None
    keep_freed_memory()  # this process builds the shards when --workers is 1
    try:
        with tqdm(unit="row", desc="prep", file=sys.stderr, disable=True if args.no_progress else None) as bar:
            stats = run_prep(records, args.out, config, source=str(source.resolve()), progress=bar.update,
                             retry_failed=args.retry_failed, overwrite=args.overwrite, **engine)
    except ResumeMismatch as err:
        raise CliError(f"{err}; pass --overwrite to replace them") from None
    except (ManifestError, NotADirectoryError) as err:
        raise CliError(str(err)) from None
    except (ClusterError, WorkerDied) as err:
        raise CliError(str(err)) from None
    print(_summary(stats))
    return 0
