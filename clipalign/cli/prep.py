"""``clipalign prep``: turn an image-caption manifest or folder into WebDataset shards."""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from clipalign.cli.common import CliError, existing_path, parser, read_templates

_OUTPUTS = ("stats.json", "sizes.json", "errors.jsonl")


def build_parser() -> argparse.ArgumentParser:
    p = parser("prep", "Read a .csv/.tsv/.jsonl manifest (image path + caption columns; relative paths are "
               "relative to the manifest's folder) or a folder of images with same-stem .txt captions, and "
               "write WebDataset shards DIR/00000.tar, ... plus stats.json, sizes.json and errors.jsonl. "
               "Bad samples (missing/undecodable image, empty caption) are skipped and listed.")
    p.add_argument("input", help="manifest file (.csv, .tsv, .jsonl) or folder of images + .txt captions")
    p.add_argument("--out", required=True, help="output folder for the shards")
    p.add_argument("--image-col", default="image", help="manifest column holding image paths")
    p.add_argument("--caption-col", default="caption", help="manifest column holding captions")
    p.add_argument("--image-size", type=int, default=256, help="target image side in pixels")
    p.add_argument("--resize-mode", default="center_crop", choices=["center_crop", "keep_ratio", "border", "no"],
                   help="img2dataset semantics")
    p.add_argument("--format", default="jpg", choices=["jpg", "webp", "png"], help="image encoding in the shards")
    p.add_argument("--quality", type=int, default=95, help="jpg/webp quality")
    p.add_argument("--shard-size", type=int, default=10_000, help="samples per shard")
    p.add_argument("--workers", type=int, default=1, help="decoding processes (shards do not depend on it)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.add_argument("--eval-set", choices=["classification", "retrieval"], default=None,
                   help="write an evaluation set in CLIP_benchmark's wds/ layout instead of training shards: "
                        "classification from an ImageFolder tree or an (image, label) manifest, retrieval from "
                        "an (image, caption) manifest (rows of one image give it several captions)")
    p.add_argument("--split", default="test", help="split folder of --eval-set (test, or train for linear probes)")
    p.add_argument("--label-col", default="label", help="manifest column holding class labels (--eval-set classification)")
    p.add_argument("--templates-file", default=None,
                   help="prompt templates for --eval-set classification, one per line with {c} (default: CLIP's simple ones)")
    return p


def _eval_set(args: argparse.Namespace, source: Path) -> int:
    from data_prep.evalprep import classification_set, retrieval_set
    from data_prep.manifest import ManifestError

    out = Path(args.out)
    if (out / args.split / "nshards.txt").exists() and not args.overwrite:
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


def _clear_outputs(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} exists and is not a folder")
    old = [p for p in out.glob("*.tar") if re.fullmatch(r"\d{5}\.tar", p.name)] if out.is_dir() else []
    if old and not overwrite:
        raise CliError(f"{out} already holds {len(old)} shard(s); pass --overwrite to replace them")
    for p in old + [out / name for name in _OUTPUTS]:
        p.unlink(missing_ok=True)


def _summary(stats: dict) -> str:
    reasons = ", ".join(f"{k}: {v}" for k, v in stats["skipped_by_reason"].items())
    skipped = f"skipped {stats['skipped']}" + (f" ({reasons})" if reasons else "")
    return (f"prep: wrote {stats['written']} samples in {stats['shards']} shard(s) to {stats['output']}, "
            f"{skipped} [{stats['duration_s']:.1f} s, {stats['samples_per_s'] or 0:.0f} samples/s]")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("image_size", "shard_size", "workers"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 1 <= args.quality <= 100:
        raise CliError(f"--quality must be in 1..100, got {args.quality}")
    source = existing_path(args.input, "input")
    if args.eval_set:
        return _eval_set(args, source)

    from tqdm import tqdm

    from data_prep.manifest import ManifestError, open_records
    from data_prep.prep import PrepConfig, run_prep

    try:
        records = open_records(source, image_col=args.image_col, caption_col=args.caption_col)
    except ManifestError as err:
        raise CliError(str(err)) from None
    except OSError as err:
        raise CliError(f"cannot read {source}: {err}") from None
    out = Path(args.out)
    _clear_outputs(out, args.overwrite)
    config = PrepConfig(
        image_size=args.image_size, resize_mode=args.resize_mode, image_format=args.format,
        quality=args.quality, shard_size=args.shard_size, workers=args.workers,
    )
    with tqdm(unit="sample", desc="prep", file=sys.stderr, disable=None) as bar:
        stats = run_prep(records, out, config, progress=bar.update)
    print(_summary(stats))
    return 0
