"""Bring your own model: open_clip weights and a Hugging Face CLIP folder in every inference command.

Both models are built here with random weights (nothing is downloaded): ``ca-nano`` saved with
``torch.save(model.state_dict())``, and a tiny ``transformers.CLIPModel`` of its own sizes saved
with ``save_pretrained``. Each goes through classify, eval, embed, index, search (text and
image), serve and export, and what comes out is checked against the model's own library
(open_clip's ``encode_image``/``encode_text``, transformers' ``get_*_features``).
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import quote

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import clipalign.factory  # noqa: F401  (registers ca-nano with open_clip)
from clipalign.cli import main
from clipalign.formats.folders import EmbeddingsFolder, IndexFolder
from clipalign.model_source import HF_NAME_PREFIX, ModelSource, load_model_source
from retrieval.embed import load_embeddings

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}
TEXTS = ["a red square", "a blue square on grey", "something green"]
HF_SIZES = dict(projection_dim=24, text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, max_position_embeddings=32),
                vision=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                            image_size=32, patch_size=8))


def _image(colour: str, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    a = rng.integers(100, 156, (32, 32, 3)).astype(np.uint8)
    x, y = rng.integers(0, 20, 2)
    a[y:y + 12, x:x + 12] = COLOURS[colour]
    return Image.fromarray(a)


def _features(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class Reference:
    """A model's own library: ``images(paths)`` and ``texts(texts)`` as (N, D) unit vectors."""

    def __init__(self, image_fn, text_fn, logit_scale: float):
        self.image_fn, self.text_fn, self.logit_scale = image_fn, text_fn, logit_scale

    @torch.no_grad()
    def images(self, paths) -> np.ndarray:
        return torch.nn.functional.normalize(self.image_fn([Image.open(p).convert("RGB") for p in paths]), dim=-1).numpy()

    @torch.no_grad()
    def texts(self, texts) -> np.ndarray:
        return torch.nn.functional.normalize(self.text_fn(list(texts)), dim=-1).numpy()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("byom")
    images = root / "images"
    images.mkdir()
    for i, colour in enumerate(list(COLOURS) * 2):
        _image(colour, i).save(images / f"{i:02d}.png")
        (images / f"{i:02d}.txt").write_text(f"a {colour} square")
    for colour in ("red", "blue"):
        (root / "evalset" / colour).mkdir(parents=True)
        for i in range(2):
            _image(colour, 100 + i).save(root / "evalset" / colour / f"{i}.png")
    (root / "templates.txt").write_text("{c}\n")

    torch.manual_seed(0)
    clip = open_clip.create_model("ca-nano")
    torch.save(clip.state_dict(), root / "nano.pt")
    torch.manual_seed(1)
    torch.save(open_clip.create_model("ca-nano").state_dict(), root / "other.pt")

    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(projection_dim=HF_SIZES["projection_dim"],
                        text_config=dict(vocab_size=49408, hidden_act="quick_gelu", bos_token_id=49406,
                                         eos_token_id=49407, pad_token_id=0, **HF_SIZES["text"]),
                        vision_config=dict(hidden_act="quick_gelu", **HF_SIZES["vision"]))
    torch.manual_seed(2)
    hf = CLIPModel(config).eval()
    hf.save_pretrained(root / "hf", safe_serialization=True)

    oc, _, preprocess = open_clip.create_model_and_transforms("ca-nano", pretrained=str(root / "nano.pt"))
    oc.eval()
    tokenize = open_clip.get_tokenizer("ca-nano")
    pixels = open_clip.image_transform(32, is_train=False)  # open_clip's eval transform, also for the HF model
    refs = {
        "open_clip": Reference(lambda ims: oc.encode_image(torch.stack([preprocess(i) for i in ims])),
                               lambda ts: oc.encode_text(tokenize(ts)), float(oc.logit_scale.detach().exp())),
        "hf": Reference(lambda ims: _features(hf.get_image_features(pixel_values=torch.stack([pixels(i) for i in ims]))),
                        lambda ts: _features(hf.get_text_features(input_ids=open_clip.tokenize(ts, context_length=32))),
                        float(hf.logit_scale.detach().exp())),
    }
    flags = {"open_clip": ["--model", "ca-nano", "--pretrained", str(root / "nano.pt")],
             "hf": ["--pretrained", str(root / "hf")]}
    return {"root": root, "images": sorted(images.glob("*.png")), "refs": refs, "flags": flags}


SOURCES = ["open_clip", "hf"]


@pytest.fixture(scope="module")
def indexes(world):
    """One index per source, built in one step from the image folder."""
    out = {}
    for source in SOURCES:
        folder = world["root"] / f"index-{source}"
        assert main(["index", *world["flags"][source], "--data", str(world["root"] / "images"), "--out", str(folder),
                     "--no-progress"]) == 0
        out[source] = folder
    return out


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("source", SOURCES)
def test_embed_gives_the_models_own_embeddings_and_records_where_it_came_from(world, source, tmp_path):
    out = tmp_path / "emb"
    assert main(["embed", *world["flags"][source], "--data", str(world["root"] / "images"), "--out", str(out),
                 "--dtype", "float32", "--no-progress"]) == 0
    vectors, rows, info = load_embeddings(out)
    ref = world["refs"][source]
    np.testing.assert_allclose(vectors["image"], ref.images([r["source"] for r in rows]), atol=1e-5)
    np.testing.assert_allclose(vectors["caption"], ref.texts([r["caption"] for r in rows]), atol=1e-5)

    weights = world["root"] / ("nano.pt" if source == "open_clip" else "hf/model.safetensors")
    recorded = info["model_source"]
    assert recorded["kind"] == source
    assert recorded["files"][str(weights.resolve())]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    name = info["model"]["name"]
    assert name == "ca-nano" if source == "open_clip" else name.startswith(HF_NAME_PREFIX)

    copy = torch.load(EmbeddingsFolder(out).model, weights_only=True)  # the copy is weights and plain types
    assert copy["model_name"] == name and ("model_config" in copy) == (source == "hf")
    assert not any(k.startswith("mlm_head.") for k in copy["model"])  # no random head in the identity


@pytest.mark.parametrize("source", SOURCES)
def test_index_and_search_by_text_and_by_image(world, indexes, source, capsys):
    ref = world["refs"][source]
    paths = [str(p) for p in world["images"]]
    image_vectors = ref.images(paths)
    info = json.loads(IndexFolder(indexes[source]).info.read_text())
    assert info["model_source"]["kind"] == source and info["model_source"]["files"]
    capsys.readouterr()

    assert main(["search", "--index", str(indexes[source]), "--text", TEXTS[0], "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["results"]
    scores = image_vectors @ ref.texts(TEXTS[:1])[0]
    assert [h["source"] for h in hits] == [paths[i] for i in np.argsort(-scores)[:3]]
    np.testing.assert_allclose([h["score"] for h in hits], np.sort(scores)[::-1][:3], atol=1e-4)

    query = paths[5]
    assert main(["search", "--index", str(indexes[source]), "--image", query, *world["flags"][source],
                 "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["results"]
    scores = image_vectors @ image_vectors[5]
    assert hits[0]["source"] == query and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    np.testing.assert_allclose([h["score"] for h in hits], np.sort(scores)[::-1][:3], atol=1e-4)


def test_a_query_model_other_than_the_indexs_is_refused(world, indexes, capsys):
    other = ["--model", "ca-nano", "--pretrained", str(world["root"] / "other.pt")]
    capsys.readouterr()
    assert main(["search", "--index", str(indexes["open_clip"]), "--text", "x", *other]) == 2
    line = _one_error_line(capsys)
    assert "the index was built with model 'ca-nano'" in line and "search with the model the index was built with" in line
    assert main(["search", "--index", str(indexes["hf"]), "--image", str(world["images"][0]),
                 *world["flags"]["open_clip"]]) == 2
    assert "the query model embeds into 64 dimensions, the index holds 24-d vectors" in _one_error_line(capsys)


def test_embeddings_of_one_model_are_not_resumed_with_another(world, tmp_path, capsys):
    out = str(tmp_path / "emb")
    data = ["--data", str(world["root"] / "images"), "--out", out, "--no-progress"]
    assert main(["embed", *world["flags"]["open_clip"], *data]) == 0
    capsys.readouterr()
    assert main(["embed", "--model", "ca-nano", "--pretrained", str(world["root"] / "other.pt"), *data]) == 2
    assert "holds embeddings with another model" in _one_error_line(capsys)


@pytest.mark.parametrize("source", SOURCES)
def test_serve_answers_with_the_given_model(world, indexes, source, monkeypatch):
    import retrieval.server as server_module

    real, answers = server_module.make_server, []

    def make_server(engine, host, port, quiet=False):
        server = real(engine, "127.0.0.1", 0, quiet=True)

        def serve_one_query() -> None:  # instead of serving forever: one real request, then stop
            thread = threading.Thread(target=type(server).serve_forever, args=(server,), daemon=True)
            thread.start()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
                conn.request("GET", "/search?k=2&text=" + quote(TEXTS[1]))
                answers.append(json.loads(conn.getresponse().read()))
                conn.close()
            finally:
                server.shutdown()
                thread.join()

        server.serve_forever = serve_one_query
        return server

    monkeypatch.setattr(server_module, "make_server", make_server)
    assert main(["serve", "--index", str(indexes[source]), *world["flags"][source], "--port", "0", "--quiet"]) == 0
    ref = world["refs"][source]
    scores = ref.images(world["images"]) @ ref.texts(TEXTS[1:2])[0]
    np.testing.assert_allclose([h["score"] for h in answers[0]["results"]], np.sort(scores)[::-1][:2], atol=1e-4)


@pytest.mark.parametrize("source", SOURCES)
def test_classify_gives_the_models_own_probabilities(world, source, capsys):
    paths = [str(p) for p in world["images"][:3]]
    classes = ["red", "green", "blue"]
    assert main(["classify", *paths, *world["flags"][source], "--classes", ",".join(classes), "-k", "3",
                 "--templates-file", str(world["root"] / "templates.txt"), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    ref = world["refs"][source]
    probs = torch.from_numpy(ref.logit_scale * ref.images(paths) @ ref.texts(classes).T).softmax(-1).numpy()
    for r, want in zip(results, probs):
        got = {p["class"]: p["prob"] for p in r["predictions"]}
        assert got == pytest.approx(dict(zip(classes, want.tolist())), abs=1e-4)


@pytest.mark.parametrize("source", SOURCES)
def test_eval_gives_the_models_own_accuracy(world, source, tmp_path):
    out = tmp_path / "results.json"
    assert main(["eval", *world["flags"][source], "--data", str(world["root"] / "evalset"), "--out", str(out),
                 "--templates-file", str(world["root"] / "templates.txt"), "--no-progress"]) == 0
    result = json.loads(out.read_text())["results"]["evalset"]
    ref = world["refs"][source]
    classes = ["blue", "red"]  # ImageFolder: the sub-folders, sorted
    paths = [world["root"] / "evalset" / c / f"{i}.png" for c in classes for i in range(2)]
    predicted = (ref.images(paths) @ ref.texts(classes).T).argmax(1)
    assert result["metrics"]["acc1"] == pytest.approx(float(np.mean(predicted == [0, 0, 1, 1])))
    assert result["pretrained"] == str((world["root"] / ("nano.pt" if source == "open_clip" else "hf")).resolve())


def test_export_turns_open_clip_weights_into_a_hf_folder_that_agrees(world, tmp_path):
    from transformers import CLIPModel

    assert main(["export", *world["flags"]["open_clip"], "--out", str(tmp_path / "hf"), "--format", "hf"]) == 0
    hf = CLIPModel.from_pretrained(tmp_path / "hf").eval()
    pixels = open_clip.image_transform(32, is_train=False)
    ims = [Image.open(p).convert("RGB") for p in world["images"][:3]]
    with torch.no_grad():
        got = _features(hf.get_image_features(pixel_values=torch.stack([pixels(i) for i in ims])))
    np.testing.assert_allclose(torch.nn.functional.normalize(got, dim=-1).numpy(),
                               world["refs"]["open_clip"].images(world["images"][:3]), atol=1e-5)


def test_export_turns_a_hf_folder_into_open_clip_weights_that_agree(world, tmp_path, capsys):
    out = tmp_path / "oc"
    assert main(["export", *world["flags"]["hf"], "--out", str(out), "--name", "my-hf-nano"]) == 0
    open_clip.add_model_config(out / "my-hf-nano.json")
    oc, _, preprocess = open_clip.create_model_and_transforms("my-hf-nano", pretrained=str(out / "my-hf-nano.safetensors"))
    ims = [Image.open(p).convert("RGB") for p in world["images"][:3]]
    with torch.no_grad():
        image = torch.nn.functional.normalize(oc.eval().encode_image(torch.stack([preprocess(i) for i in ims])), dim=-1)
        text = torch.nn.functional.normalize(oc.encode_text(open_clip.get_tokenizer("my-hf-nano")(TEXTS)), dim=-1)
    ref = world["refs"]["hf"]
    np.testing.assert_allclose(image.numpy(), ref.images(world["images"][:3]), atol=1e-5)
    np.testing.assert_allclose(text.numpy(), ref.texts(TEXTS), atol=1e-5)


COMMANDS = {  # each command, with what it needs besides the model
    "classify": ["classify", "img.png", "--classes", "a,b"],
    "eval": ["eval", "--data", "evalset"],
    "embed": ["embed", "--data", "images", "--out", "emb"],
    "index": ["index", "--data", "images", "--out", "idx"],
    "search": ["search", "--index", "idx", "--image", "img.png"],
    "serve": ["serve", "--index", "idx"],
    "export": ["export", "--out", "exp"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("model,tag,call", [
    ("ViT-B-32", "openai", "open_clip.create_model_and_transforms('ViT-B-32', pretrained='openai')"),
    ("ViT-B-32", "laion2b_s34b_b79k", "pretrained='laion2b_s34b_b79k')"),
    (None, "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
     "open_clip.create_model_and_transforms('hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K')"),
])
def test_download_tags_are_refused_naming_the_call_that_downloads(tmp_path, monkeypatch, capsys, command, model, tag,
                                                                  call):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "idx").mkdir()
    (tmp_path / "evalset").mkdir()
    (tmp_path / "images").mkdir()
    _image("red", 0).save(tmp_path / "img.png")
    flags = (["--model", model] if model else []) + ["--pretrained", tag]
    assert main([*COMMANDS[command], *flags]) == 2
    line = _one_error_line(capsys)
    assert call in line and "local file" in line and "downloads nothing" in line
    assert not (tmp_path / "emb").exists() and not (tmp_path / "exp").exists()


def test_a_config_json_names_an_architecture_and_a_clash_is_refused(world, tmp_path):
    config = tmp_path / "my-nano.json"
    config.write_text(json.dumps(open_clip.get_model_config("ca-nano")))
    model, transform, tokenizer, meta = load_model_source(ModelSource(model=str(config),
                                                                      pretrained=str(world["root"] / "nano.pt")))
    assert meta["model_name"] == "my-nano" and meta["model_config"] == open_clip.get_model_config("ca-nano")
    with torch.no_grad():
        got = model.encode_text(tokenizer(TEXTS), normalize=True).numpy()
    np.testing.assert_allclose(got, world["refs"]["open_clip"].texts(TEXTS), atol=1e-5)

    clash = tmp_path / "ca-nano.json"  # the name of another architecture
    clash.write_text(json.dumps({**open_clip.get_model_config("ca-nano"), "embed_dim": 32}))
    with pytest.raises(ValueError, match=r"model name 'ca-nano' is taken \(rename the config file\)"):
        load_model_source(ModelSource(model=str(clash), pretrained=str(world["root"] / "nano.pt")))


def test_open_clip_weights_without_their_architecture_are_refused(world, capsys):
    assert main(["classify", str(world["images"][0]), "--classes", "a,b", "--pretrained",
                 str(world["root"] / "nano.pt")]) == 2
    assert "do not name their architecture" in _one_error_line(capsys)
    assert main(["classify", str(world["images"][0]), "--classes", "a,b", "--model", "ca-nano"]) == 2
    assert "needs its pretrained weights" in _one_error_line(capsys)
    assert main(["classify", str(world["images"][0]), "--classes", "a,b", "--checkpoint", str(world["root"] / "nano.pt"),
                 "--pretrained", str(world["root"] / "hf")]) == 2
    assert "not both" in _one_error_line(capsys)


def test_a_fresh_process_rebuilds_a_derived_model_from_the_index_alone(world, indexes, capsys):
    query = str(world["images"][2])
    assert main(["search", "--index", str(indexes["hf"]), "--image", query, "-k", "3", "--json"]) == 0
    want = json.loads(capsys.readouterr().out)["results"]
    # a new interpreter has never seen the folder's derived architecture: only the copy names it
    done = subprocess.run([sys.executable, "-m", "clipalign", "search", "--index", str(indexes["hf"]), "--image", query,
                           "-k", "3", "--json"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"},
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)["results"]
    assert [h["key"] for h in got] == [h["key"] for h in want]
    np.testing.assert_allclose([h["score"] for h in got], [h["score"] for h in want], atol=1e-5)


def test_a_checkpoint_naming_a_hub_model_is_refused_before_anything_is_fetched(world, tmp_path, capsys):
    from clipalign.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "c.pt", {"model_name": "hf-hub:someone/model", "model": {"w": torch.zeros(1)}})
    assert main(["classify", str(world["images"][0]), "--classes", "a,b", "--checkpoint", str(tmp_path / "c.pt")]) == 2
    assert "'hf-hub:someone/model', which is not a model name" in _one_error_line(capsys)


def test_embeddings_of_a_trained_run_record_its_checkpoint_file(world, tmp_path):
    from tests.retrieval_toy import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "c.pt")
    assert main(["embed", "--checkpoint", str(ckpt), "--data", str(world["root"] / "images"), "--out",
                 str(tmp_path / "emb"), "--no-progress"]) == 0
    recorded = load_embeddings(tmp_path / "emb")[2]["model_source"]
    assert recorded["kind"] == "checkpoint" and recorded["checkpoint"] == str(ckpt.resolve())
    assert recorded["files"][str(ckpt.resolve())]["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
