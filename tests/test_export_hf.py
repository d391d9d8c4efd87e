"""clipalign export --format hf: a transformers CLIPModel folder that loads offline and agrees with clipalign."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from clipalign.checkpoint import load_model, save_checkpoint
from clipalign.cli import main
from clipalign.factory import create_model

TEXTS = ["a red circle", "a photo of a blue star on the left", "something green"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    save_checkpoint(root / "c.pt", {"model_name": "ca-nano", "step": 3, "model": create_model("ca-nano").state_dict()})
    assert main(["export", str(root / "c.pt"), "--out", str(root / "hf"), "--format", "hf"]) == 0
    return root


def test_the_folder_is_complete_and_safe(exported):
    names = {p.name for p in (exported / "hf").iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "vocab.json", "merges.txt"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)  # weights only as safetensors


def test_clipmodel_gives_clipaligns_embeddings(exported):
    from transformers import CLIPModel, CLIPProcessor

    hf = CLIPModel.from_pretrained(exported / "hf").eval()
    processor = CLIPProcessor.from_pretrained(exported / "hf")
    model, transform, tokenizer, _ = load_model(exported / "c.pt")
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32, 3), np.uint8)) for i in range(2)]
    inputs = processor(text=TEXTS, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(hf.get_image_features(pixel_values=inputs["pixel_values"]),
                                   model.encode_image(torch.stack([transform(i) for i in images])), atol=1e-4, rtol=0)
        torch.testing.assert_close(hf.get_text_features(input_ids=inputs["input_ids"],
                                                        attention_mask=inputs["attention_mask"]),
                                   model.encode_text(tokenizer(TEXTS)), atol=1e-4, rtol=0)


def test_the_zero_shot_pipeline_gives_clipaligns_probabilities(exported):
    from transformers import pipeline

    classify = pipeline("zero-shot-image-classification", model=str(exported / "hf"))
    model, transform, tokenizer, _ = load_model(exported / "c.pt")
    image = Image.fromarray(np.full((32, 32, 3), (220, 30, 35), np.uint8))
    labels = ["red", "green", "blue"]
    got = {r["label"]: r["score"] for r in classify(image, candidate_labels=labels)}
    with torch.no_grad():
        img = model.encode_image(transform(image)[None], normalize=True)
        txt = model.encode_text(tokenizer([f"This is a photo of {c}." for c in labels]), normalize=True)
        probs = (model.logit_scale.exp() * img @ txt.T).softmax(-1)[0]
    assert got == pytest.approx(dict(zip(labels, probs.tolist())), abs=1e-4)


def test_a_resnet_tower_is_refused_in_one_line(tmp_path, capsys):
    save_checkpoint(tmp_path / "r.pt", {"model_name": "ca-tiny", "step": 1, "model": create_model("ca-tiny").state_dict()})
    assert main(["export", str(tmp_path / "r.pt"), "--out", str(tmp_path / "hf"), "--format", "hf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ResNet" in err[0]
