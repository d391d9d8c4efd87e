"""clipalign export --format onnx: two graphs with a dynamic batch that onnxruntime runs as torch does."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime
import torch

from clipalign.checkpoint import load_model, save_checkpoint
from clipalign.cli import main
from clipalign.factory import create_model


def test_onnx_towers_match_torch_at_any_batch(tmp_path, capsys):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "c.pt", {"model_name": "ca-tiny", "step": 2, "model": create_model("ca-tiny").state_dict()})
    assert main(["export", str(tmp_path / "c.pt"), "--out", str(tmp_path / "onnx"), "--format", "onnx"]) == 0
    info = json.loads((tmp_path / "onnx" / "onnx.json").read_text())
    assert info["opset"] == 18 and info["towers"]["image"]["shape"] == ["batch", 3, 64, 64]
    assert info["towers"]["text"]["shape"] == ["batch", 32] and info["towers"]["text"]["dtype"] == "int64"
    model, _, tokenizer, _ = load_model(tmp_path / "c.pt")
    images = torch.randn(5, 3, 64, 64)
    texts = tokenizer(["a red circle", "a green star", "x", "a large blue square at the top left", "y"])
    image = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "image.onnx")).run(None, {"pixel_values": images.numpy()})[0]
    text = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "text.onnx")).run(None, {"input_ids": texts.numpy()})[0]
    with torch.no_grad():
        assert np.abs(image - model.encode_image(images, normalize=True).numpy()).max() <= 1e-4
        assert np.abs(text - model.encode_text(texts, normalize=True).numpy()).max() <= 1e-4
        one = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "text.onnx")).run(None, {"input_ids": texts[:1].numpy()})[0]
        assert np.abs(one - model.encode_text(texts[:1], normalize=True).numpy()).max() <= 1e-4  # a batch of one too
    assert "max abs diff" in capsys.readouterr().out
