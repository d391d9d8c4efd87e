import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from clipalign import checkpoint as ckpt
from clipalign.classify import classify_images, expand_images
from clipalign.cli import main
from clipalign.factory import create_model

COLOURS = ("red", "green", "blue")


class StubModel(torch.nn.Module):
    """An image is its dominant channel; a text is the colour it names."""

    def __init__(self):
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(100.0)))

    def encode_image(self, images, normalize=False):
        return F.one_hot(images.mean(dim=(2, 3)).argmax(1), 3).float()


def _solid(path, channel):
    rgb = [0, 0, 0]
    rgb[channel] = 255
    Image.fromarray(np.full((8, 8, 3), rgb, np.uint8)).save(path)
    return path


def test_expand_images_walks_folders_and_keeps_files(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    inner = _solid(tmp_path / "a" / "b" / "x.png", 0)
    top = _solid(tmp_path / "a" / "y.jpg", 1)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    given = tmp_path / "z.png"
    assert expand_images([tmp_path / "a", given]) == [inner, top, given]


def test_known_answers_in_input_order_and_unreadable_files_counted(tmp_path):
    paths = [_solid(tmp_path / "b.png", 2), tmp_path / "missing.png", _solid(tmp_path / "r.png", 0)]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    paths.append(tmp_path / "broken.png")
    classifier = torch.eye(3)  # (D, C): class i is channel i
    results, skipped = classify_images(StubModel(), torchvision.transforms.ToTensor(), classifier, COLOURS, paths, top_k=2)
    assert [r["path"] for r in results] == [str(paths[0]), str(paths[2])]
    assert [r["predictions"][0]["class"] for r in results] == ["blue", "red"]
    assert results[0]["predictions"][0]["prob"] > 0.99 and len(results[0]["predictions"]) == 2
    assert skipped == {"missing_image": 1, "undecodable_image": 1}


def test_cli_classify_json(tmp_path, capsys):
    torch.manual_seed(0)
    ckpt.save_checkpoint(tmp_path / "model.pt", {"model_name": "ca-nano", "step": 0,
                                                 "model": create_model("ca-nano").state_dict()})
    folder = tmp_path / "imgs"
    folder.mkdir()
    _solid(folder / "r.png", 0)
    _solid(folder / "g.png", 1)
    (folder / "bad.png").write_bytes(b"nope")
    assert main(["classify", str(folder), "--checkpoint", str(tmp_path / "model.pt"),
                 "--classes", "red,green,blue", "-k", "3", "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["classes"] == list(COLOURS) and len(out["results"]) == 2
    for r in out["results"]:
        probs = [p["prob"] for p in r["predictions"]]
        assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-4)
    assert out["skipped"] == {"undecodable_image": 1} and "skipped 1" in captured.err


def test_cli_classify_needs_classes_and_images(tmp_path, capsys):
    assert main(["classify", str(tmp_path / "nothing"), "--checkpoint", str(tmp_path), "--classes", "a"]) == 2
    assert "at least two" in capsys.readouterr().err
