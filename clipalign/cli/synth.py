"""``clipalign synth``: write the embedded synthetic corpus (train manifest + held-out eval sets)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from clipalign.cli.common import CliError, add_progress_arg, default_workers, parser


def build_parser() -> argparse.ArgumentParser:
    p = parser("synth", "Generate the synthetic coloured-shapes corpus: train/manifest.csv with PNG images, "
               "held-out eval sets in CLIP_benchmark wds/ layout under eval/, and synth.json.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=20_000, help="training images")
    p.add_argument("--seed", type=int, default=0, help="seed; the same seed gives byte-identical files")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    p.add_argument("--n-eval", type=int, default=600, help="images per held-out set")
    p.add_argument("--n-bad", type=int, default=0,
                   help="extra bad training rows (missing file, corrupt/truncated images, empty captions)")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="processes rendering images (files do not depend on it)")
    add_progress_arg(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tqdm import tqdm

    from data_prep import synth

    options = dict(n=args.n, seed=args.seed, image_size=args.image_size, n_eval=args.n_eval, n_bad=args.n_bad,
                   workers=args.workers)
    start = time.perf_counter()
    try:
        with tqdm(total=synth.corpus_images(args.n, args.n_eval), unit="img", desc="synth", file=sys.stderr,
                  disable=True if args.no_progress else None) as bar:
            info = synth.write_corpus(args.out, progress=bar.update, **options)
    except ValueError as err:  # an option write_corpus cannot use (checked before anything is written)
        raise CliError(str(err)) from None
    seconds = time.perf_counter() - start
    out = Path(args.out)
    bad = f" + {args.n_bad} bad rows" if args.n_bad else ""
    held = ", ".join(f"{c} {s}" for c, s in info["held_out_pairs"])
    print(f"synth: {args.n} training images{bad} -> {out / info['splits'][synth.TRAIN_DIR]['path']}")
    print(f"synth: held-out sets, {args.n_eval} images each -> {out / synth.EVAL_DIR}/{{{','.join(synth.EVAL_SETS)}}}")
    print(f"synth: held-out pairs (never in train): {held}")
    print(f"synth: wrote {out / synth.INFO_FILE} in {seconds:.1f} s (seed {args.seed}, {args.image_size}px)")
    return 0
