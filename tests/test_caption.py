"""CoCa captioning beside clipalign's objectives: the loss falls, generation decodes, the CLI prints."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from toydata import write_toy_shards

from clipalign.loss import CaptionLoss
from clipalign.train import Trainer
from clipalign.train_config import TrainConfig


def test_caption_loss_is_open_clips_next_token_cross_entropy():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 5, 11), torch.tensor([[3, 4, 0, 0, 0], [1, 2, 3, 4, 5]])
    keep = labels != 0  # padding is ignored
    expected = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(CaptionLoss(0.5)(logits, labels)["caption_loss"], 0.5 * expected)


def test_a_model_without_a_decoder_is_refused(tmp_path):
    with pytest.raises(ValueError, match="captioning decoder"):
        Trainer(TrainConfig(data="", out=str(tmp_path), model="ca-nano", caption_weight=1.0, precision="fp32"))


@pytest.fixture(scope="module")
def coca_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("coca")
    data = write_toy_shards(root / "shards", n=64, per_shard=64)[0].rsplit("/", 1)[0]
    # through the CLI in a fresh process, as a user runs it (and free of what earlier tests set)
    subprocess.run([sys.executable, "-m", "clipalign", "train", "--data", data, "--out", str(root / "run"),
                    "--model", "ca-coca-nano", "--batch-size", "16", "--steps", "10", "--lr", "3e-3", "--warmup", "3",
                    "--workers", "0", "--shuffle-buffer", "16", "--precision", "fp32", "--no-tensorboard",
                    "--log-every", "1", "--caption-weight", "1", "--mlm-weight", "0.1", "--checkpoint-every", "10",
                    "--image-ssl", "none", "--no-progress"],  # the caption loss with clipalign's text objectives
                   check=True, capture_output=True)
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    return root, rows


def test_the_caption_loss_falls_on_a_small_corpus(coca_run):
    _, rows = coca_run
    first, last = np.mean([r["caption_loss"] for r in rows[:3]]), np.mean([r["caption_loss"] for r in rows[-3:]])
    assert last < 0.7 * first and all("contrastive_loss" in r and "mlm_loss" in r for r in rows)


def test_clipalign_caption_prints_decoded_captions(coca_run, tmp_path):
    root, _ = coca_run
    Image.fromarray(np.full((32, 32, 3), (200, 30, 30), np.uint8)).save(tmp_path / "red.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    run = subprocess.run([sys.executable, "-m", "clipalign", "caption", str(tmp_path), "--checkpoint",
                          str(root / "run"), "--max-tokens", "6", "--json"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert [r["path"].rsplit("/", 1)[1] for r in out["results"]] == ["red.png"]
    caption = out["results"][0]["caption"]
    assert caption and "<start_of_text>" not in caption and len(caption.split()) <= 6
    assert out["skipped"] == {"undecodable_image": 1}


def test_a_coca_run_resumes_step_exact(tmp_path):
    from clipalign import checkpoint as ckpt

    data = write_toy_shards(tmp_path / "shards", n=32, per_shard=32)[0].rsplit("/", 1)[0]
    kw = dict(data=data, model="ca-coca-nano", batch_size=8, steps=4, warmup=1, workers=0, shuffle_buffer=8,
              precision="fp32", tensorboard=False, caption_weight=1.0, checkpoint_every=2, keep_checkpoints=0,
              image_ssl="none")  # the captioning decoder's resume; SimCLR's is tested in test_train_objectives
    whole = Trainer(TrainConfig(out=str(tmp_path / "whole"), **kw))
    whole.fit()
    ckpt.save_checkpoint(tmp_path / "resumed" / "checkpoints" / "step_00000002.pt",
                         ckpt.load_checkpoint(tmp_path / "whole" / "checkpoints" / "step_00000002.pt"))
    resumed = Trainer(TrainConfig(out=str(tmp_path / "resumed"), resume=True, **kw))
    assert resumed.fit()["steps_this_run"] == 2
    for name, p in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], p), name


def test_a_random_coca_decoder_projection_is_seeded_not_left_over_memory():
    from clipalign.factory import create_model

    def projection(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return create_model("ca-coca-nano").clip.text_decoder.text_projection.detach().clone()

    first = projection(0)
    junk = [torch.full((first.numel(),), float("nan")) for _ in range(8)]  # freed memory full of NaN
    del junk
    again = projection(0)
    assert torch.isfinite(first).all()
    assert torch.equal(first, again)
    assert not torch.equal(first, projection(1))
    assert abs(first.std().item() - first.shape[0] ** -0.5) < 0.2 * first.shape[0] ** -0.5
