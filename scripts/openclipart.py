"""Build a real image-caption corpus from Debian's openclipart-png clip art (see docs/real_data.md).

About 6,900 public-domain PNGs in 22 category folders, captioned by their file names (cleaned of
author credits and numbering) with the folders as context ("animals: cat"). A seeded 15% of the
images is held out, all images of a name together. The package is installed with apt-get if
/usr/share/openclipart is missing; ``clipalign prep --eval-set`` writes the evaluation sets.
    python scripts/openclipart.py --out /tmp/openclipart_real [--train-shards]
Writes into --out: train.csv (image,caption pairs), train_coco.json (the same, one sample per
image), clipart.csv (every image, with its split), eval_retrieval/ and eval_category/ (wds/ sets of
the held-out images, with their .csv), corpus.json, and images (a symlink to --root).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from PIL import Image

from corpus_tools import BuildError, Parser, prep, write_csv  # scripts/ is on sys.path

PACKAGE, ROOT = "openclipart-png", Path("/usr/share/openclipart/png")
LICENCE = "public domain: Creative Commons Public Domain Dedication (/usr/share/doc/openclipart-png/copyright)"
MAX_PIXELS, MIN_SIDE = 89478485, 8  # prep's decompression-bomb limit; a smaller side is a broken rendering
NO_CATEGORY = ("special", "unsorted")  # top folders that say nothing about the content: no class, no context
CROSS_STYLE_MIN = 100  # names drawn by 2+ authors that a cross-style set would need; the package has about 50
CLASS_TEMPLATES = ("{c}", "a clip art of {c}", "{c} clip art")  # the training captions say "{category}: {name}"
# Authors credited at the end of file names; names of 21+ characters were cut, so there a credit's start matches
AUTHORS = """
architetto_francesco_rollandin rollandin_architetto_francesco rollandin_francesco_architetto francesco_rollandin
frolland glenn_rolland benji_park susan_park nicu_buculei jon_phillips gerald_g jarno_vasamaa linda_kim juliane_krug
dan_gerhards dan_gerhrads yves_guillou jean_victor_balin jean_vitor_balin enrique_meza_c dave_pena mateya mimooh peterm
frouke romus mo ganson fudriot_omic.ch fabien_omic.ch openclipart guillaume_boitel patricia_fidi frederic_moser
aubanel_monnier auban geraint_luff arjen_meijer mirjam_meijer a.j._ashton aj_ashton stefan_bazelkov brice_boyer
olivier_boyer cedric_bosdonnat guziec costea_bogdan dirk_struve marcelo_staudt marcelo_caiafa clemente toh_yen_cheng
nicolas_clementz nicolas_cle anthony_liekens jonvdveen christoph_brill christophe dennis_rutjes dennis_bo karl_bartel
nathan_eady astrid_graeber philippe_colin jorkon john_rariden stefan_alfredsson sherrera matthew_gates fco._andrade
tanguy_jacq leif_lodahl mauro_olivo fabio_olivo charles_mccolm erich_schubert matt_todd jordan_wiens joerg_rosenbauer
tess_brady joeseph_teed borja_bravo nicolas nicolas_gagliani nicola nico didier_fabert santiago_diaz rory_mccann
tobias_jakobs tom_hung michael_moore teudimundo kurt_cagle nurbldoff nurbldoff_ksc nubldoff andrei_z dudziak_tomek amos
tristan_le_toullec the_structorr anton_yu anton_fr jakob_chaosinfait william_page tom_webb kilian_valkhof
jurgen_gaeremyn jurgen andreas_nilsson alex_kuehne orlando_karam rob_lucas utrescu k_yager fearzip rikva loz uliphant
revdoug merzok roberto_u konstantin_r ingoenius ff77 chris_kempson james_birkett anita erik_postma ron_golan rgolan_sup
ezechiele wilc tatiana_coutinho vikingdread erwan sek davek magnus_erik_l gabrielle_nowicki carlos_katastrofsky
risto_pekkala t._eitel matthew_wel ryan_phil stepan_kli multimotyl giuseppe_m kexi_team jaime_sanchez andrew_fitzsimon
andy_fitzsimon angelo_gelmi petri_lummemaki raphael_seban ross_merrigan david_klan jure_kodzoman vladimir_hernandez
jeff_walden alberto_piccin chris_hin virgin dave_reckoning hans_deragon darkon david_wislon bram_gron ali_hussn
shandy_brown celso_junior domas_jo sergio_luiz_araujo s_rgio_luiz_ara_jo joel_montes_de_oca joel_leht ruud_steltenpool
chaspo lion_kimbro kurt_nordstrom fredrik_holmqvist loic_corwin mark_near richard_torkar yogesh_kanitkar einar
daniel_mcr abiclipart goneri_le_bouder neil_turner gino_rivera michael_tunnicliffe james_kilfiger mikhail_a.medvedev
frank_warttig niels_epting emule.org stefan_illner michael_breuer jasper_van_de_gronde wes alex_fernandez terry
miguel_s_nchez robert_seitz jesper_zedlitz schwoo ghuul_ghuul yemu seth_yastrov theerud_law kevin_cowtan phentex orbu
josu_alcalde_bas renante_tomas mike_honeychurch andy_bur felipe_macie felipescu jamin_ellis b_r_kessels mike_powers
jeff_simpson stuart_moore mailto israel_c jonathan_dietrich bradley_whit davide_pesent saint gabriel_lo
mitchell_johnson igor_k mariusz_k marcin_wi darek_adamkiewicz afief_halumi giuli rick_beton lauris_kaplinski muji
havok_redh martin_koz saurabh_nanda jonadab graig_ryan_smith christian_h andremarcel alejandro_tejada aitor_avila
omar_abo_namous taller_ga mazdac tom_kra lumen_design_studio leigh_purdie daniel_steele massimo_aiello etienne_bersac
michael_ja ruairi_hann durex michael_hart timothy_whit danny_allen kimiko luca zazou martin_schmidt_li hardi
andrea_bianc mike steve guido roman_bertle wolfram_es renardjb_on_free.fr snuatautisticido nathan_hawke steffen_gluck
janet_theobald mirko_maisch starexter www.jonasstein bob federico paul http_www.treebuilder jean_maurice thomas ani_ani
lorenzo_luengo jon_campbell vermin rick denco gmv nae mike_sm rodrigo_t
""".split()
AUTHOR_TOKENS = [([t.rstrip(".") for t in a.split("_")], a) for a in AUTHORS]
RANKS, SUITS = dict(a="ace", j="jack", q="queen", k="king"), dict(c="clubs", d="diamonds", h="hearts", s="spades")
NUMBERING = re.compile(r"(_(\d+[a-z]?|r)?)+$")  # trailing "_01", "_01a", "_01r", "_r", "_"




def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog="openclipart.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="output folder (created; files in it are replaced)")
    p.add_argument("--root", type=Path, default=ROOT, help="the package's PNG folder")
    p.add_argument("--install", action="store_true", help=f"run apt-get install {PACKAGE} first (needs root)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and of the row order")
    p.add_argument("--test-frac", type=float, default=0.15, help="fraction of the images held out")
    p.add_argument("--min-class", type=int, default=10, help="categories with fewer held-out images are left out")
    p.add_argument("--image-size", type=int, default=64, help="image side in the shards and evaluation sets")
    p.add_argument("--train-shards", action="store_true", help="also run clipalign prep on train.csv into OUT/train/")
    args = p.parse_args(argv)
    if not 0.0 < args.test_frac < 1.0 or min(args.min_class, args.image_size) < 1:
        p.error("--test-frac must be in (0, 1), --min-class and --image-size >= 1")
    return args


def ensure_package(root: Path, install: bool) -> str:
    """apt-get install the package if asked to or if the default --root is missing; return its version."""
    if install or (root == ROOT and not root.exists()):
        print(f"openclipart: installing the Debian package {PACKAGE} (about 130 MB) with apt-get", flush=True)
        done = subprocess.run(["apt-get", "install", "-y", "-qq", "-o", "DPkg::Lock::Timeout=300", PACKAGE],
                              env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
            raise BuildError(f"apt-get install {PACKAGE} failed (exit {done.returncode}; it needs root): {last}")
    if not root.is_dir():
        raise BuildError(f"--root {root} is not a folder")
    return subprocess.run(["dpkg-query", "-Wf", "${Version}", PACKAGE], capture_output=True, text=True).stdout or "?"


def author_at_end(tokens: list[str], cut: bool) -> tuple[int, str]:
    """Start of the leftmost author credit ending ``tokens``, and the author: "" if none, "?" if ambiguous."""
    for start in range(len(tokens)):
        tail = [t.rstrip(".") for t in tokens[start:]]
        found = {name for a, name in AUTHOR_TOKENS if tail == a or (cut and len(tail) <= len(a) and tail[:-1] == a[
            :len(tail) - 1] and a[len(tail) - 1].startswith(tail[-1]))}
        if found:
            return start, found.pop() if len(found) == 1 else "?"
    return len(tokens), ""


def clean_name(stem: str, folder: str) -> tuple[str, str]:
    """(caption name, author) of the file ``folder/stem.png``. The rules, in order:

    - CamelCase is split, all is lower case, '-' counts as '_'. Cards ``white_h_q`` are "queen of
      hearts", ``*_jk_r`` "red joker"; ``star_93pt13step`` is "93-pointed star".
    - Numbering goes: ``_01``, ``_01a``, ``_01r``, ``_r``, a trailing ``_``, a leading 0-padded number
      (``002_text``), digits glued to a word after 3+ letters (``bus1``, ``tigre01``) or, at the end of
      a name of 3+ words, after any (``stairs_up1``); ``_hash_0x...`` and ``clipart_by_<author>_-_`` go
      too. ``_39_`` (HTML's &#39;) is an apostrophe, ``_amp_`` "and", ``rubik_s_cube`` "rubik's cube",
      ``bw`` "black and white", ``*_0_symbol_1m_bwh`` "* map symbol".
    - A trailing author credit (``AUTHORS``) goes, then the numbering again. In a name of 21+
      characters (cut) a leading part of a credit matches ("_architetto_fr", "_benji_p", "_g");
      a 1-2 letter variant after a whole credit goes with it ("_linda_kim_aa"). Words are joined by spaces.
    """
    stem = re.sub(r"(?<=[a-z])(?=[A-Z])", "_", stem).lower().replace("-", "_")
    if folder.startswith("recreation/games/cards/") and (m := re.fullmatch(r"[a-z]+_([cdhs])_(\d+|[ajqk])", stem)):
        return f"{RANKS.get(m[2], m[2])} of {SUITS[m[1]]}", ""
    if m := re.fullmatch(r"[a-z]+_jk_([br])|star_(\d+)pt\d+step", stem):
        return ("black joker" if m[1] == "b" else "red joker") if m[1] else f"{int(m[2])}-pointed star", ""
    cut = len(re.sub(r"_(\d\d|\d*r)?$", "", stem)) >= 21
    stem = re.sub(r"_hash_0x[0-9a-f]*|^clipart_by_[a-z_]+?___|^0\d*_", "", stem)
    stem = re.sub(r"(_\d)?_symbol_\d+c?m_bwh$", "_map_symbol", stem.replace("_39_", "'").replace("_amp_", "_and_"))
    glued = r"(?<=[a-z])\d+$" if stem.count("_") > 1 else r"(?<=[a-z]{3})\d+$"  # keep "connector_db25"
    tokens = NUMBERING.sub("", re.sub(glued, "", stem)).split("_")
    end, author = author_at_end(tokens[:-1], False) if len(tokens) > 2 and len(tokens[-1]) <= 2 else (0, "")
    end, author = (end, author) if author else author_at_end(tokens, cut)
    words: list[str] = []
    for token in NUMBERING.sub("", "_".join(tokens[:end])).split("_"):
        token = re.sub(r"(?<=[a-z]{3})\d+$", "", token).strip(".")
        if token in ("s", "t") and words:
            words[-1] += "'" + token
        elif token:
            words.append("black and white" if token == "bw" else token)
    return " ".join(words), author


def scan(root: Path, counts: Counter) -> list[dict]:
    """Every PNG under ``root`` once (a symlink adds its folder and name to its target's) with its names,
    author, categories and captions; ``counts`` gets what was left out and why."""
    paths: dict[Path, list[Path]] = defaultdict(list)
    for path in sorted(root.rglob("*.png")):
        counts.update(png_paths=1, symlinks=path.is_symlink())  # a link out of root is a ValueError: the build stops
        paths[path.resolve().relative_to(root.resolve())].append(path.relative_to(root))
    Image.MAX_IMAGE_PIXELS = None  # only the sizes are read: nothing is decoded here
    images = []
    for real, found in sorted(paths.items()):
        with Image.open(root / real) as img:
            size = img.size
        if size[0] * size[1] > MAX_PIXELS or min(size) < MIN_SIDE:
            counts["too_large" if size[0] * size[1] > MAX_PIXELS else "too_small"] += 1
            continue
        names, authors, tops, captions = {}, set(), set(), {}
        for path in sorted(found, key=lambda p: (p != real, p)):  # the file's own name first
            name, author = clean_name(path.stem, path.parent.as_posix())
            top, leaf = (" ".join(re.sub(r"^\d+_|[-_]", " ", folder).lower().split())
                         for folder in (path.parts[0], path.parent.name))  # "00_strawberry_border": "strawberry border"
            context = ([leaf] if leaf != top else []) + ([] if path.parts[0] in NO_CATEGORY else [top])
            tops.update([] if path.parts[0] in NO_CATEGORY else [top])
            if name:
                names[name] = None
                authors.add(author)
                captions.update(dict.fromkeys([name, f"a clip art of {name}", *(f"{c}: {name}" for c in context)]))
        if not names:
            counts["no_name"] += 1
            continue
        images.append({"image": f"images/{real.as_posix()}", "names": list(names), "captions": list(captions),
                       "author": "; ".join(sorted(authors - {""})), "categories": sorted(tops),
                       "folders": sorted({p.parent.as_posix() for p in found})})
    return images


def name_groups(images: list[dict]) -> list[list[int]]:
    """Indices of ``images`` grouped so that all the images of a name are in one group."""
    group_of: dict[str, set[int]] = {}
    for i, img in enumerate(images):
        merged = {i}.union(*(group_of.get(name, ()) for name in img["names"]))
        group_of.update((name, merged) for j in merged for name in images[j]["names"])
    return sorted({id(group): sorted(group) for group in group_of.values()}.values())




def build(args: argparse.Namespace) -> dict:
    """Install, scan, split and write everything into ``args.out``; return what corpus.json holds."""
    start, out, counts = time.time(), args.out.resolve(), Counter()  # resolved: prep runs in the repository
    if out.exists() and not out.is_dir() or (out / "images").exists() and not (out / "images").is_symlink():
        raise BuildError(f"--out {out} is not a folder, or its images is not a symlink")
    version = ensure_package(args.root, args.install)
    if not (images := scan(args.root, counts)):
        raise BuildError(f"no usable PNGs in the folders of {args.root}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "images").unlink(missing_ok=True)
    (out / "images").symlink_to(args.root.resolve(), target_is_directory=True)
    rng, groups, test, shown = random.Random(args.seed), name_groups(images), set(), []
    for group in rng.sample(groups, len(groups)):  # whole groups until test_frac of the images are held out
        if len(test) >= args.test_frac * len(images):
            break
        test.update(group)
        shown.append(rng.choice(group))  # the group's one image in eval_retrieval: its captions are its own
    train, held = [img for i, img in enumerate(images) if i not in test], [images[i] for i in sorted(test)]
    pairs = [(img["image"], c) for img in train for c in img["captions"]]
    rng.shuffle(pairs)
    write_csv(out / "train.csv", ("image", "caption"), pairs)
    notes = [(i, c) for i, img in enumerate(train) for c in img["captions"]]
    (out / "train_coco.json").write_text(json.dumps({
        "images": [{"id": i, "file_name": img["image"]} for i, img in enumerate(train)],
        "annotations": [{"id": j, "image_id": i, "caption": c} for j, (i, c) in enumerate(notes)]}), encoding="utf-8")
    write_csv(out / "clipart.csv", ("image", "name", "category", "folders", "author", "split"), [
        (img["image"], *("; ".join(img[k]) for k in ("names", "categories", "folders")), img["author"],
         "test" if i in test else "train") for i, img in enumerate(images)])
    fmt = ("--image-size", str(args.image_size), "--format", "png", "--resize-mode", "border")
    retrieval = [(images[i]["image"], c) for i in sorted(shown) for c in images[i]["captions"]]
    write_csv(out / "eval_retrieval.csv", ("image", "caption"), retrieval)
    logs = {"eval_retrieval": prep(str(out / "eval_retrieval.csv"), "--out", str(out / "eval_retrieval"), "--overwrite",
                                   "--eval-set", "retrieval", *fmt)}
    (out / "class_templates.txt").write_text("".join(t + "\n" for t in CLASS_TEMPLATES), encoding="utf-8")
    sizes = Counter(img["categories"][0] for img in held if len(img["categories"]) == 1)
    kept = sorted(c for c, n in sizes.items() if n >= args.min_class)
    labels = [(img["image"], img["categories"][0]) for img in held if len(img["categories"]) == 1
              and img["categories"][0] in kept]  # images of 2+ categories are left out
    write_csv(out / "eval_category.csv", ("image", "label"), labels)
    logs["eval_category"] = prep(str(out / "eval_category.csv"), "--out", str(out / "eval_category"), "--overwrite",
                                 "--eval-set", "classification", "--templates-file", str(out / "class_templates.txt"),
                                 *fmt)
    if args.train_shards:
        logs["train"] = prep(str(out / "train.csv"), "--out", str(out / "train"), "--overwrite", *fmt)
    drawings: dict[str, Counter] = defaultdict(Counter)  # cross-style candidates: names drawn by 2+ known authors
    for img in images:
        for name in img["names"] if img["author"] and ";" not in img["author"] and img["author"] != "?" else ():
            drawings[name][img["author"]] += 1
    cross = {name: dict(sorted(by.items())) for name, by in sorted(drawings.items()) if len(by) > 1}
    counts.update(images=len(images), names=len({n for img in images for n in img["names"]}), train_images=len(train),
                  train_pairs=len(pairs), test_images=len(held), eval_retrieval_captions=len(retrieval),
                  eval_retrieval_images=len(shown), eval_category_images=len(labels),
                  test_images_in_2_categories=sum(len(img["categories"]) > 1 for img in held))
    corpus = {"package": {"name": PACKAGE, "version": version}, "licence": LICENCE, "resize_mode": "border",
              "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "counts": counts,
              "classification": {"classes": {c: sizes[c] for c in kept}, "templates": CLASS_TEMPLATES,
                                 "left_out": {c: n for c, n in sorted(sizes.items()) if c not in kept}},
              "cross_style": {"names": len(cross), "needed": CROSS_STYLE_MIN, "built": False, "by_author": cross},
              "prep_output": logs, "build_seconds": round(time.time() - start, 1)}
    (out / "corpus.json").write_text(json.dumps(corpus, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return corpus


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        corpus = build(args)
    except (BuildError, OSError, ValueError) as err:
        print(f"openclipart: error: {err}", file=sys.stderr)
        return 2
    c = corpus["counts"]
    print(f"openclipart: {c['images']} images ({c['train_images']} train, {c['test_images']} held out), "
          f"{c['train_pairs']} train pairs, {corpus['build_seconds']} s -> {args.out}\n  cross-style: "
          f"{corpus['cross_style']['names']} names drawn by 2+ authors (a set needs {CROSS_STYLE_MIN}; none written)")
    for line in corpus["prep_output"].values():
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
