"""clipalign eval agrees with CLIP_benchmark (the ``clip-benchmark`` package) on an exported run.

CLIP_benchmark runs in a subprocess that never imports clipalign, through
``scripts/clip_benchmark_eval.py`` on the ``clipalign export`` folder, CPU, fp32 (``--no_amp``).

Definitions compared (CLIP_benchmark 1.6.2, ``clip_benchmark/metrics/``):
- classification: class vectors = mean of the normalised template embeddings, renormalised;
  logits = 100 * image @ classes (no learned logit scale); acc1/acc5 = top-k hit rate;
  mean_per_class_recall = sklearn's balanced accuracy (classes present in the targets).
- retrieval: recall@k is 1 for a query with *any* positive in its top k, averaged over queries;
  an image has several captions. CLIP_benchmark's default ``--recall_k`` is only 5, and a
  ``wds/`` set's task is inferred as classification from its name, so the wrapper is given
  ``--task zeroshot_retrieval --recall_k 1 5 10``.

Edge cases (the first is pinned by a test, the others are known differences):
- acc5 with fewer than 5 classes: both report NaN (top-5 is undefined);
  ``test_acc5_with_fewer_than_5_classes`` pins it.
- recall@k with k > number of candidates: CLIP_benchmark raises (``torch.topk``); clipalign clamps k.
- blank lines in classnames/templates files and blank caption lines: clipalign drops them,
  CLIP_benchmark keeps them (as a class "", a template "", a caption "").
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from clipalign.cli import main

pytest.importorskip("clip_benchmark", reason="clip-benchmark is in the dev extra: pip install -e '.[dev]'")

WRAPPER = Path(__file__).resolve().parents[1] / "scripts" / "clip_benchmark_eval.py"
CLASSIFICATION = ["shape_seen", "color_unseen", "shape_four"]  # 6, 8 and 4 classes
TOL = 1e-6

# One interpreter for both CLIP_benchmark runs (its import alone takes seconds); it calls the
# wrapper's main(argv) once per task, exactly as the command line would.
DRIVER = r"""
import json, runpy, sys
wrapper = runpy.run_path(sys.argv[1])["main"]
for argv in json.loads(sys.argv[2]):
    assert wrapper(argv) == 0, argv
assert "clipalign" not in sys.modules
"""


def _four_class_set(src: Path, dst: Path, n_classes: int = 4) -> None:
    """A copy of classification set ``src`` keeping only its first ``n_classes`` classes."""
    (dst / "test").mkdir(parents=True)
    keep = set()
    with tarfile.open(src / "test" / "0.tar") as tin:
        members = tin.getmembers()
        for m in members:
            if m.name.endswith(".cls") and int(tin.extractfile(m).read()) < n_classes:
                keep.add(m.name.rsplit(".", 1)[0])
        with tarfile.open(dst / "test" / "0.tar", "w") as tout:
            for m in members:
                if m.name.rsplit(".", 1)[0] in keep:
                    tout.addfile(m, tin.extractfile(m))
    (dst / "test" / "nshards.txt").write_text("1\n")
    classes = (src / "classnames.txt").read_text().splitlines()[:n_classes]
    (dst / "classnames.txt").write_text("\n".join(classes) + "\n")
    for name in ("zeroshot_classification_templates.txt", "dataset_type.txt"):
        (dst / name).write_bytes((src / name).read_bytes())


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    """``{"clipalign": {set: metrics}, "clip_benchmark": {set: metrics}}`` for the same exported run."""
    root = tmp_path_factory.mktemp("agreement")
    corpus, shards, run, export = root / "corpus", root / "shards", root / "run", root / "export"
    assert main(["synth", "--out", str(corpus), "--n", "200", "--n-eval", "40", "--image-size", "32",
                 "--workers", "1"]) == 0
    assert main(["prep", str(corpus / "train" / "manifest.csv"), "--out", str(shards), "--image-size", "32"]) == 0
    assert main(["train", "--data", str(shards), "--out", str(run), "--model", "ca-nano", "--steps", "3",
                 "--batch-size", "32", "--warmup", "1", "--workers", "0", "--no-progress"]) == 0
    assert main(["export", str(run), "--out", str(export)]) == 0
    sets = corpus / "eval"
    _four_class_set(sets / "shape_seen", sets / "shape_four")

    paths = [str(sets / name) for name in [*CLASSIFICATION, "retrieval"]]
    assert main(["eval", "--checkpoint", str(run), "--data", *paths, "--out", str(root / "clipalign.json"),
                 "--batch-size", "16", "--no-progress"]) == 0
    ours = {k: v["metrics"] for k, v in json.loads((root / "clipalign.json").read_text())["results"].items()}

    out = root / "clip_benchmark"
    out.mkdir()
    common = ["--model", "ca-nano", "--pretrained", str(export / "ca-nano.safetensors"), "--dataset_root", f"{sets}/{{dataset}}",
              "--no_amp", "--num_workers", "0", "--batch_size", "16", "--output", f"{out}/{{dataset}}.json", "--quiet"]
    runs = [
        [str(export), "eval", "--dataset", *(f"wds/{n}" for n in CLASSIFICATION), *common],
        [str(export), "eval", "--dataset", "wds/retrieval", "--task", "zeroshot_retrieval", "--recall_k", "1", "5", "10",
         *common],
    ]
    done = subprocess.run([sys.executable, "-c", DRIVER, str(WRAPPER), json.dumps(runs)], cwd=root,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = {p.stem: json.loads(p.read_text())["metrics"] for p in out.glob("*.json")}
    return {"clipalign": ours, "clip_benchmark": theirs}


@pytest.mark.parametrize("name", ["shape_seen", "color_unseen"])
def test_classification_metrics_agree(results, name):
    ours, theirs = results["clipalign"][name], results["clip_benchmark"][name]
    for key in ("acc1", "acc5", "mean_per_class_recall"):
        assert ours[key] == pytest.approx(theirs[key], abs=TOL), key


def test_retrieval_metrics_agree(results):
    ours, theirs = results["clipalign"]["retrieval"], results["clip_benchmark"]["retrieval"]
    keys = [f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)]
    assert set(keys) <= theirs.keys()
    for key in keys:
        assert ours[key] == pytest.approx(theirs[key], abs=TOL), key


def test_acc5_with_fewer_than_5_classes(results):
    ours, theirs = results["clipalign"]["shape_four"], results["clip_benchmark"]["shape_four"]
    for key in ("acc1", "mean_per_class_recall"):
        assert ours[key] == pytest.approx(theirs[key], abs=TOL), key
    assert math.isnan(theirs["acc5"])  # CLIP_benchmark: top-5 is undefined with 4 classes
    assert math.isnan(ours["acc5"])
