"""clipalign export: the written config + state dict give plain open_clip the same embeddings."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from PIL import Image

from clipalign.checkpoint import checkpoint_path, load_model, save_checkpoint
from clipalign.cli import main
from clipalign.factory import create_model, get_model_config
from clipalign.train import TrainConfig

TEXTS = ["a red circle.", "a photo of a blue star.", "something green"]

# Runs in a fresh interpreter that never imports clipalign: the model config can only come
# from the export folder. Writes the image/text embeddings of each exported name.
OPEN_CLIP_USER = r"""
import json, sys
import open_clip
import torch
from PIL import Image

export_dir, out_file, images, texts, names = sys.argv[1], sys.argv[2], *map(json.loads, sys.argv[3:6])
unknown = [n for n in names if open_clip.get_model_config(n) is not None]
assert not unknown, f"open_clip knew {unknown} before add_model_config"
open_clip.add_model_config(export_dir)
out = {}
for name in names:
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=f"{export_dir}/{name}.safetensors")
    model.eval()
    pixels = torch.stack([preprocess(Image.open(p)) for p in images])
    with torch.no_grad():
        out[name] = {"image": model.encode_image(pixels), "text": model.encode_text(open_clip.get_tokenizer(name)(texts)),
                     "logit_scale": model.logit_scale.detach().clone()}
assert "clipalign" not in sys.modules
torch.save(out, out_file)
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run folder holding one checkpoint in the Trainer's layout, with non-default weights."""
    run = tmp_path_factory.mktemp("export") / "run"
    torch.manual_seed(1234)
    model = create_model("ca-nano")  # with the MLM head, as trained
    with torch.no_grad():  # move every weight off open_clip's init so a failed load cannot pass
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
        model.logit_scale.fill_(3.21)
    save_checkpoint(checkpoint_path(run, 7), {
        "step": 7, "model_name": "ca-nano", "config": asdict(TrainConfig(data="", out=str(run), model="ca-nano")), "model": model.state_dict(),
        "optimizer": {"state": {}, "param_groups": []}, "scheduler": {}, "rng": {},
    })
    return run


@pytest.fixture(scope="module")
def exported(run) -> Path:
    out = run.parent / "open_clip"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert main(["export", str(checkpoint_path(run, 7)), "--out", str(out), "--name", "my-nano"]) == 0
    return out


def test_export_writes_the_open_clip_config_and_only_the_clip_weights(run, exported):
    assert sorted(p.name for p in exported.iterdir()) == ["ca-nano.json", "ca-nano.safetensors", "my-nano.json", "my-nano.safetensors"]
    assert json.loads((exported / "ca-nano.json").read_text()) == get_model_config("ca-nano")
    assert (exported / "my-nano.json").read_text() == (exported / "ca-nano.json").read_text()

    from safetensors.torch import load_file

    state = load_file(exported / "ca-nano.safetensors")  # tensors only, no pickle
    model = load_model(run)[0]
    assert state.keys() == model.clip.state_dict().keys()
    assert not any(k.startswith(("clip.", "mlm_head.")) for k in state)
    assert all(torch.equal(v, model.clip.state_dict()[k]) for k, v in state.items())


def test_plain_open_clip_gives_the_same_embeddings(run, exported, tmp_path):
    images = []
    for i, color in enumerate(["red", "navy", "yellow"]):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (40 + 8 * i, 36), color).save(path)  # not 32x32: the transforms must agree too
        images.append(str(path))
    names = ["ca-nano", "my-nano"]
    out_file = tmp_path / "open_clip.pt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(
        [sys.executable, "-c", OPEN_CLIP_USER, str(exported), str(out_file), *map(json.dumps, (images, TEXTS, names))],
        check=True, cwd=tmp_path, env=env, timeout=120,
    )
    theirs = torch.load(out_file, weights_only=True)

    model, transform, tokenizer, _ = load_model(run)
    with torch.no_grad():
        image = model.encode_image(torch.stack([transform(Image.open(p)) for p in images]))
        text = model.encode_text(tokenizer(TEXTS))
    for name in names:
        torch.testing.assert_close(theirs[name]["image"], image, atol=1e-5, rtol=0)
        torch.testing.assert_close(theirs[name]["text"], text, atol=1e-5, rtol=0)
        assert theirs[name]["logit_scale"].item() == pytest.approx(3.21)


@pytest.mark.parametrize("case", ["missing_run", "empty_run_folder", "bad_name"])
def test_bad_input_is_a_one_line_error(case, run, tmp_path, capsys):
    argv = {
        "missing_run": ["export", str(tmp_path / "does-not-exist"), "--out", str(tmp_path / "x")],
        "empty_run_folder": ["export", str(tmp_path), "--out", str(tmp_path / "x")],
        "bad_name": ["export", str(run), "--out", str(tmp_path / "x"), "--name", "../escape"],
    }[case]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("clipalign export: error:")
    assert not (tmp_path / "x").exists()


def test_a_siglip_model_exports_with_its_logit_bias(tmp_path):
    import open_clip

    from clipalign.export import export_open_clip
    from clipalign.factory import create_model

    torch.manual_seed(0)
    model = create_model("ca-nano", init_logit_bias=-7.5)
    save_checkpoint(tmp_path / "run" / "m.pt", {"model_name": "ca-nano", "step": 0, "model": model.state_dict()})
    info = export_open_clip(tmp_path / "run" / "m.pt", tmp_path / "out", name="nano-siglip")
    open_clip.add_model_config(tmp_path / "out")
    clip = open_clip.create_model("nano-siglip", pretrained=info["weights"])
    assert clip.logit_bias.item() == -7.5
