"""Build a real, held-out image-text set from emoji artwork in two styles (see docs/real_data.md).

Train on one style's images (default Google's Noto) with captions made from the Unicode names,
evaluate on another style (default Twitter's Twemoji) of the same named things. 20% of the
names are held out of training entirely, so retrieval is reported on seen and unseen names.

Everything comes from npm packages (``emoji-datasource*``, pinned versions) fetched with
``npm pack`` into a cache; the evaluation sets are written by ``clipalign prep --eval-set``.

    python scripts/real_emoji.py --out /tmp/emoji_real
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

from PIL import Image

from corpus_tools import BuildError, Parser, prep, write_csv  # scripts/ is on sys.path

STYLES = ("google", "twitter", "apple", "facebook")
IMAGE_LICENCES = {  # from each package's README (its LICENSE file is the MIT licence of the packaging)
    "google": "Apache-2.0 (Noto Emoji)", "twitter": "CC-BY-4.0 (Twemoji)",
    "apple": "Copyright Apple Inc., not licensed for commercial use", "facebook": "Copyright Facebook, unclear licence",
}
CLASS_TEMPLATES = ("{c} emoji", "an emoji of {c}", "{c}")  # the training captions say "{category} emoji: {name}"




def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(
        prog="real_emoji.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="writes into --out:\n"
               "  train.csv             image,caption: one row per (train-style image, caption) pair\n"
               "  train_coco.json       the same pairs, one sample per image (prep --caption-mode all)\n"
               "  images/<style>/       the 64 px PNGs of both styles, flattened onto white\n"
               "  emoji.csv             every emoji: image, unified, name, category, subcategory, split\n"
               "  eval_retrieval_seen/, eval_retrieval_unseen/, eval_category/, eval_subcategory/\n"
               "                        test-style CLIP_benchmark wds/ sets (+ the .csv each was made from)\n"
               "  corpus.json           packages, versions, sha256, counts, split, seed")
    p.add_argument("--out", required=True, type=Path, help="output folder (created; files in it are replaced)")
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                   / "clipalign" / "emoji", help="folder for the npm tarballs and their extracted files")
    p.add_argument("--version", default="16.0.0", help="exact version of every emoji-datasource* package")
    p.add_argument("--train-style", default="google", choices=STYLES, help="image set of train.csv")
    p.add_argument("--test-style", default="twitter", choices=STYLES, help="image set of the evaluation sets")
    p.add_argument("--seed", type=int, default=0, help="seed of the name split, the seen sample and the row order")
    p.add_argument("--unseen-frac", type=float, default=0.2, help="fraction of names held out of training")
    p.add_argument("--min-class", type=int, default=20, help="classes with fewer test images are left out")
    p.add_argument("--image-size", type=int, default=64, help="image side in the evaluation sets (the PNGs are 64)")
    p.add_argument("--train-shards", action="store_true", help="also run clipalign prep on train.csv into OUT/train/")
    args = p.parse_args(argv)
    if args.train_style == args.test_style:
        p.error("--train-style and --test-style must differ")
    if not 0.0 < args.unseen_frac < 1.0:
        p.error(f"--unseen-frac must be in (0, 1), got {args.unseen_frac}")
    if args.min_class < 1 or args.image_size < 1:
        p.error("--min-class and --image-size must be >= 1")
    if not all(c.isdigit() or c == "." for c in args.version):
        p.error(f"--version must be an exact version like 16.0.0, got {args.version!r}")
    return args


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fetch_package(name: str, version: str, cache: Path) -> tuple[Path, Path]:
    """``npm pack name@version`` into ``cache`` (unless there already); returns the tarball and its package/ folder."""
    tgz = cache / f"{name}-{version}.tgz"
    if not tgz.is_file():
        if shutil.which("npm") is None:
            raise BuildError(f"npm not found, and no cached {tgz}")
        cache.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["npm", "pack", f"{name}@{version}", "--pack-destination", str(cache), "--loglevel", "error"],
                              capture_output=True, text=True)
        if done.returncode != 0 or not tgz.is_file():
            lines = done.stderr.strip().splitlines() or ["no output"]  # npm's 2nd line says why
            raise BuildError(f"npm pack {name}@{version} failed: {lines[min(1, len(lines) - 1)]}")
    root = cache / f"{name}-{version}"
    if not (root / ".extracted").is_file():
        extract(tgz, root)
    return tgz, root / "package"


def extract(tgz: Path, dest: Path) -> None:
    """Extract the top-level files and img/<set>/64/ PNGs of ``tgz`` into ``dest``; no absolute paths or '..'."""
    with tarfile.open(tgz, "r:gz") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if member.name.startswith(("/", "\\")) or ".." in parts or not parts:
                raise BuildError(f"{tgz}: unsafe member path {member.name!r}")
            wanted = len(parts) == 2 or (len(parts) == 5 and parts[1] == "img" and parts[3] == "64")
            if not member.isfile() or not wanted:
                continue  # no links, devices or sprite sheets; folders come from the files' parents
            target = dest.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(target, "wb") as dst:  # type: ignore[union-attr]
                shutil.copyfileobj(src, dst)
    (dest / ".extracted").write_text("ok\n")


def words(text: str) -> str:
    """Lower-case caption text: '&' spelt out, '_' as a space, whitespace collapsed."""
    return " ".join(text.lower().replace("&", " and ").replace("_", " ").split())


def load_emoji(meta: Path, styles: tuple[str, str]) -> list[dict]:
    """The emoji drawn in both styles (no skin-tone components), each with a unique lower-case name."""
    rows = [e for e in json.loads((meta / "emoji.json").read_text(encoding="utf-8"))
            if e["category"] != "Component" and all(e.get(f"has_img_{s}") for s in styles)]
    rows.sort(key=lambda e: e["sort_order"])
    counts = Counter(words(e["name"]) for e in rows)
    seen: set[str] = set()
    emoji = []
    for e in rows:
        name = words(e["name"])
        if counts[name] > 1:  # e.g. two "MAN IN TUXEDO": fall back to the short name (person_in_tuxedo)
            name = next((words(s) for s in e["short_names"] if words(s) not in counts), name)
        if name in seen:
            continue
        seen.add(name)
        alts = [a for a in dict.fromkeys(words(s.replace("-", " ")) for s in e["short_names"]  # woman-running
                                         if not s.startswith("flag-") and any(c.isalpha() for c in s)) if a != name]
        emoji.append({"image": e["image"], "unified": e["unified"], "name": name, "alts": alts,
                      "category": words(e["category"]), "subcategory": words(e["subcategory"].replace("-", " "))})
    return emoji


def flatten(src: Path) -> Image.Image:
    """The PNG ``src`` composited onto white, as an RGB image."""
    with Image.open(src) as img:
        rgba = img.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    canvas.alpha_composite(rgba)
    return canvas.convert("RGB")


def write_images(emoji: list[dict], roots: dict[str, Path], out: Path) -> tuple[list[dict], list[str]]:
    """Save each style's flattened images under ``out/images/<style>/``. Of emoji whose image in some style
    is identical (Twemoji draws all families alike), only the shortest name is kept; the others are returned."""
    images = {}
    for style, root in roots.items():
        src = root / "img" / style / "64"
        missing = [e["image"] for e in emoji if not (src / e["image"]).is_file()]
        if missing:
            raise BuildError(f"{len(missing)} {style} images are missing from {src}, e.g. {missing[0]}")
        images[style] = [flatten(src / e["image"]) for e in emoji]
        (out / "images" / style).mkdir(parents=True, exist_ok=True)
    kept, hashes = set(), {style: set() for style in roots}
    for i in sorted(range(len(emoji)), key=lambda i: (len(emoji[i]["name"]), i)):
        digests = {style: hashlib.sha256(images[style][i].tobytes()).hexdigest() for style in roots}
        if not any(digests[style] in hashes[style] for style in roots):
            kept.add(i)
            for style in roots:
                hashes[style].add(digests[style])
                images[style][i].save(out / "images" / style / emoji[i]["image"])
    return [e for i, e in enumerate(emoji) if i in kept], [e["name"] for i, e in enumerate(emoji) if i not in kept]


def train_captions(e: dict, banned: set[str]) -> list[str]:
    """Caption variants of one emoji, from its name, short names, subcategory and category."""
    caps = [e["name"], f"an emoji of {e['name']}", f"{e['subcategory']} emoji: {e['name']}",
            f"{e['category']} emoji: {e['name']}"]
    caps += [f"an emoji of {a}" for a in e["alts"] if a not in banned]  # no held-out name, even as another's alias
    return list(dict.fromkeys(caps))




def eval_set(out: Path, name: str, header: tuple[str, str], rows: list[tuple[str, str]], *flags: str) -> str:
    """Write ``rows`` as ``out/name.csv`` and prep them into the wds/ set ``out/name/``."""
    manifest = out / f"{name}.csv"
    write_csv(manifest, header, rows)
    return prep(str(manifest), "--out", str(out / name), "--overwrite", *flags)


def build(args: argparse.Namespace) -> dict:
    """Fetch, split and write everything into ``args.out``; return what corpus.json holds."""
    start = time.time()
    out: Path = args.out.resolve()  # resolved: prep runs in the repository
    if out.exists() and not out.is_dir():
        raise BuildError(f"--out {out} exists and is not a folder")
    styles = (args.train_style, args.test_style)
    packages = {}
    for name in ("emoji-datasource", *(f"emoji-datasource-{s}" for s in styles)):
        tgz, root = fetch_package(name, args.version, args.cache)
        packages[name] = {"version": args.version, "tarball": tgz.name, "sha256": sha256(tgz), "root": root}
    emoji = load_emoji(packages["emoji-datasource"]["root"], styles)
    emoji, duplicates = write_images(emoji, {s: packages[f"emoji-datasource-{s}"]["root"] for s in styles}, out)

    rng = random.Random(args.seed)
    names = sorted(e["name"] for e in emoji)
    unseen = set(rng.sample(names, round(len(names) * args.unseen_frac)))
    seen_emoji = [e for e in emoji if e["name"] not in unseen]
    unseen_emoji = [e for e in emoji if e["name"] in unseen]
    train_img, test_img = f"images/{args.train_style}/", f"images/{args.test_style}/"

    pairs = [(train_img + e["image"], c) for e in seen_emoji for c in train_captions(e, unseen)]
    rng.shuffle(pairs)
    write_csv(out / "train.csv", ("image", "caption"), pairs)
    coco = {"images": [{"id": i, "file_name": train_img + e["image"]} for i, e in enumerate(seen_emoji)],
            "annotations": [{"id": j, "image_id": i, "caption": c} for j, (i, c) in enumerate(
                (i, c) for i, e in enumerate(seen_emoji) for c in train_captions(e, unseen))]}
    (out / "train_coco.json").write_text(json.dumps(coco, ensure_ascii=False), encoding="utf-8")
    write_csv(out / "emoji.csv", ("image", "unified", "name", "category", "subcategory", "split"),
              [(e["image"], e["unified"], e["name"], e["category"], e["subcategory"],
                "unseen" if e["name"] in unseen else "seen") for e in emoji])

    fmt = ("--image-size", str(args.image_size), "--format", "png")
    seen_sample = sorted(rng.sample(seen_emoji, min(len(unseen_emoji), len(seen_emoji))), key=lambda e: e["name"])
    logs = {}
    for name, members in (("seen", seen_sample), ("unseen", sorted(unseen_emoji, key=lambda e: e["name"]))):
        rows = [(test_img + e["image"], e["name"]) for e in members]  # one caption: the name
        logs[f"eval_retrieval_{name}"] = eval_set(out, f"eval_retrieval_{name}", ("image", "caption"), rows,
                                                  "--eval-set", "retrieval", *fmt)
    templates = out / "class_templates.txt"
    templates.write_text("".join(t + "\n" for t in CLASS_TEMPLATES), encoding="utf-8")
    classes = {}
    for field in ("category", "subcategory"):
        sizes = Counter(e[field] for e in emoji)
        kept = sorted(c for c, n in sizes.items() if n >= args.min_class)
        rows = [(test_img + e["image"], e[field]) for e in emoji if e[field] in kept]
        name = f"eval_{field}"
        logs[name] = eval_set(out, name, ("image", "label"), rows, "--eval-set", "classification",
                              "--templates-file", str(templates), *fmt)
        classes[name] = {"classes": {c: sizes[c] for c in kept}, "images": len(rows),
                         "left_out": {c: n for c, n in sorted(sizes.items()) if c not in kept}}
    if args.train_shards:
        logs["train"] = prep(str(out / "train.csv"), "--out", str(out / "train"), "--overwrite", *fmt)

    corpus = {
        "packages": {k: {x: v[x] for x in ("version", "tarball", "sha256")} for k, v in packages.items()},
        "image_licences": {s: IMAGE_LICENCES[s] for s in styles}, "packaging_licence": "MIT (emoji-datasource)",
        "train_style": args.train_style, "test_style": args.test_style, "seed": args.seed,
        "unseen_frac": args.unseen_frac, "min_class": args.min_class, "image_size": args.image_size,
        "counts": {"emoji": len(emoji), "identical_image_dropped": len(duplicates), "seen_names": len(seen_emoji),
                   "unseen_names": len(unseen_emoji), "train_images": len(seen_emoji), "train_pairs": len(pairs),
                   "eval_retrieval_seen": len(seen_sample), "eval_retrieval_unseen": len(unseen_emoji)},
        "identical_image_dropped": duplicates,
        "classification": classes, "class_templates": list(CLASS_TEMPLATES),
        "split": {"unseen_names": sorted(unseen), "eval_retrieval_seen_names": [e["name"] for e in seen_sample]},
        "prep_output": logs, "build_seconds": round(time.time() - start, 1),
    }
    (out / "corpus.json").write_text(json.dumps(corpus, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return corpus


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        corpus = build(args)
    except (BuildError, OSError) as err:
        print(f"real_emoji: error: {err}", file=sys.stderr)
        return 2
    c = corpus["counts"]
    print(f"real_emoji: {c['emoji']} emoji ({c['seen_names']} seen, {c['unseen_names']} unseen names), "
          f"{c['train_pairs']} train pairs, {corpus['build_seconds']} s -> {args.out}")
    for line in corpus["prep_output"].values():
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
