"""retrieval.image_query: the torch-free preprocessing gives open_clip's eval transform bit for bit,
the ONNX image tower answers image searches as the full model does without importing torch, and
any transform it cannot reproduce, or a missing onnxruntime, gets no fast path."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from clipalign.cli import main
from clipalign.formats.folders import IndexFolder
from clipalign.model_source import load_model_source
from retrieval.engine import open_engine
from retrieval.identity import model_identity
from retrieval.image_query import Preprocess, export_image_query, load_image_query, preprocess_of
from tests.retrieval_toy import make_checkpoint, make_index


def _images(seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(1, 1), (7, 300), (300, 7), (33, 32), (32, 33), (64, 48), (129, 257), (500, 333)]
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    return images + [images[5].convert("L"), images[6].convert("RGBA"), images[7].convert("P"),
                     images[3].convert("CMYK")]


@pytest.mark.parametrize("options", [
    {"image_size": 32}, {"image_size": 224}, {"image_size": 40, "resize_mode": "squash"},
    {"image_size": 36, "interpolation": "bilinear"}, {"image_size": 30, "mean": (0.5, 0.5, 0.5), "std": (0.2, 0.3, 0.4)},
])
def test_the_preprocessing_is_open_clips_eval_transform_bit_for_bit(options):
    transform = open_clip.image_transform(is_train=False, **options)
    preprocess = preprocess_of(transform)
    assert preprocess is not None
    assert Preprocess.from_json(json.loads(json.dumps(preprocess.to_json()))) == preprocess  # what the info keeps
    for image in _images(seed=3):
        want = transform(image.convert("RGB")).numpy()
        got = preprocess(image)
        assert got.dtype == np.float32 and np.array_equal(got, want), (image.size, image.mode)


@pytest.mark.parametrize("transform", [
    open_clip.image_transform(32, is_train=True),  # random crops: no query should see those
    open_clip.image_transform(32, is_train=False, resize_mode="longest"),  # pads: not reproduced here
    open_clip.image_transform((48, 40), is_train=False),  # open_clip's keep-ratio resize
    lambda image: torch.zeros(3, 32, 32),
])
def test_a_transform_it_does_not_reproduce_gets_no_fast_path(model, tmp_path, transform):
    assert preprocess_of(transform) is None
    assert export_image_query(model[0], transform, tmp_path, model[2]) is None
    assert not IndexFolder(tmp_path).image_query.exists()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(model, eval transform, identity) of an untrained ca-nano checkpoint."""
    built, transform, _, meta = load_model_source(make_checkpoint(tmp_path_factory.mktemp("m") / "c.pt"))
    return built.eval(), transform, model_identity(meta["model_name"], built.state_dict())


def test_the_onnx_tower_reproduces_the_model_at_any_batch(model, tmp_path):
    built, transform, identity = model
    entry = export_image_query(built, transform, tmp_path, identity)
    assert entry == {"file": IndexFolder(tmp_path).image_query.name, "preprocess": preprocess_of(transform).to_json(),
                     "model_identity": identity}
    encode = load_image_query(entry, IndexFolder(tmp_path).image_query.read_bytes())
    images = _images(seed=7)  # not the images it was checked on
    with torch.no_grad():
        want = built.encode_image(torch.stack([transform(im.convert("RGB")) for im in images]), normalize=True).numpy()
    for batch in (slice(0, 1), slice(0, len(images)), slice(4, 9)):
        got = encode(images[batch])
        assert got.dtype == np.float32 and np.abs(got - want[batch]).max() <= 1e-5


def test_no_fast_path_without_onnxruntime(model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    assert export_image_query(*model[:2], tmp_path, model[2]) is None
    assert not IndexFolder(tmp_path).image_query.exists()


def test_an_image_search_takes_the_tower_without_torch_and_finds_what_the_full_model_finds(tmp_path, capsys):
    index = make_index(tmp_path, n=32)
    query = tmp_path / "q.png"
    _images(seed=11)[7].save(query)
    code = ("import json, sys; from clipalign.cli import main; rc = main(['search', '--index', sys.argv[1], "
            "'--image', sys.argv[2], '-k', '5', '--json']); "
            "print(json.dumps(['torch' in sys.modules, 'open_clip' in sys.modules]), file=sys.stderr); sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, str(index), str(query)], capture_output=True, text=True, check=True)
    assert json.loads(done.stderr.strip().splitlines()[-1]) == [False, False]
    fast = json.loads(done.stdout)["results"]
    engine = open_engine(index)
    tower, locked = engine._image_query(), []
    engine._image_query = lambda: dataclasses.replace(
        tower, preprocess=lambda im: (locked.append(engine._lock.locked()), tower.preprocess(im))[1])
    assert [r["id"] for r in engine.search_image_file(query, 5)[0]] == [r["id"] for r in fast]
    assert locked == [False]  # preprocessed outside the model lock: a big upload's resize holds up no text query
    folder = IndexFolder(index)
    folder.image_query.unlink()  # the same search through the full model
    info = json.loads(folder.info.read_text())
    info.pop("image_query"), info["files"].pop(folder.image_query.name)
    folder.info.write_text(json.dumps(info))
    assert main(["search", "--index", str(index), "--image", str(query), "-k", "5", "--json"]) == 0
    full = json.loads(capsys.readouterr().out)["results"]
    assert [r["id"] for r in fast] == [r["id"] for r in full]
    assert np.allclose([r["score"] for r in fast], [r["score"] for r in full], atol=1e-5)


def test_a_tower_that_does_not_reproduce_the_model_is_not_kept(model, tmp_path, monkeypatch):
    import clipalign.export_onnx

    other, _, _, _ = load_model_source(make_checkpoint(tmp_path / "other.pt", seed=1))
    real = clipalign.export_onnx.export_tower
    monkeypatch.setattr(clipalign.export_onnx, "export_tower",
                        lambda _model, tower, example, path, **options: real(other, tower, example, path, **options))
    assert export_image_query(*model[:2], tmp_path, model[2]) is None
    assert not IndexFolder(tmp_path).image_query.exists()
