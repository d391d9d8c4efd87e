"""MAE on the visible patches: the loss against the paper's definition, one encoder pass, ViT only."""
from __future__ import annotations

import pytest
import torch
from toydata import write_toy_shards

from clipalign.factory import create_model
from clipalign.loss import MaeLoss
from clipalign.mae import RecordingPatchDropout, install_recording_dropout, mae_decoder_for, patchify
from clipalign.train import Trainer
from clipalign.train_config import TrainConfig


def reference_mae_loss(pred, images, kept, patch):
    """MAE (He et al. 2022), written plainly: per image, per dropped patch, normalise the
    patch's pixels by their own mean and variance, take the squared error, average."""
    losses = []
    b, c, h, w = images.shape
    for i in range(b):
        n = 0
        for row in range(h // patch):
            for col in range(w // patch):
                if n not in kept[i].tolist():
                    pixels = images[i, :, row * patch:(row + 1) * patch, col * patch:(col + 1) * patch]
                    target = pixels.permute(1, 2, 0).reshape(-1)  # (p, p, 3): the order patchify uses
                    target = (target - target.mean()) / (target.var() + 1e-6).sqrt()
                    losses.append(((pred[i, n] - target) ** 2).mean())
                n += 1
    return torch.stack(losses).mean()


def test_mae_loss_equals_the_papers_definition():
    torch.manual_seed(0)
    images = torch.randn(3, 3, 16, 16)
    kept = torch.stack([torch.randperm(16)[:6] for _ in range(3)])
    pred = torch.randn(3, 16, 4 * 4 * 3)
    got = MaeLoss(weight=2.0)(pred, patchify(images, 4), kept)["image_ssl_loss"]
    torch.testing.assert_close(got, 2.0 * reference_mae_loss(pred, images, kept, 4))


def test_recording_dropout_drops_what_open_clips_would_and_says_which():
    from open_clip.transformer import PatchDropout

    x = torch.randn(2, 1 + 16, 8)
    torch.manual_seed(3)
    theirs = PatchDropout(0.5)(x)
    torch.manual_seed(3)
    ours = RecordingPatchDropout(0.5)
    mine = ours(x)
    torch.testing.assert_close(mine, theirs)
    torch.testing.assert_close(mine[:, 1:], x[:, 1:][torch.arange(2)[:, None], ours.kept])


def test_the_decoder_sees_the_contrastive_pass_and_trains_the_image_tower():
    model = create_model("ca-nano", force_patch_dropout=0.5)
    dropout = install_recording_dropout(model.clip.visual, 0.5)
    decoder = mae_decoder_for(model.clip.visual)
    calls = []
    model.clip.visual.register_forward_hook(lambda *_: calls.append(1))
    images = torch.randn(4, 3, 32, 32)
    out = model(images, model.clip.visual.conv1.weight.new_zeros(4, 8).long() + 7, image_tokens=True)
    assert out["image_tokens"].shape[:2] == dropout.kept.shape == (4, 8)  # half of the 4x4 patches
    pred = decoder(out["image_tokens"], dropout.kept)
    MaeLoss()(pred, patchify(images, 8), dropout.kept)["image_ssl_loss"].backward()
    assert len(calls) == 1  # one image-tower pass for the contrastive features and the reconstruction
    assert model.clip.visual.conv1.weight.grad.abs().sum() > 0


def test_a_resnet_tower_or_no_patch_dropout_is_refused_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="needs a ViT image tower"):
        install_recording_dropout(create_model("ca-tiny").clip.visual, 0.5)
    with pytest.raises(ValueError, match="--patch-dropout"):
        TrainConfig(data="x", out="y", model="ca-nano", image_ssl="mae").validate(paths=False)


def test_a_trainer_with_mae_resumes_step_exact(tmp_path):
    from clipalign import checkpoint as ckpt

    data = write_toy_shards(tmp_path / "shards", n=64, per_shard=32)[0].rsplit("/", 1)[0]
    kw = dict(data=data, model="ca-nano", batch_size=16, steps=4, warmup=1, workers=0, shuffle_buffer=16,
              precision="fp32", tensorboard=False, image_ssl="mae", patch_dropout=0.5, checkpoint_every=2,
              keep_checkpoints=0, log_every=1)
    whole = Trainer(TrainConfig(out=str(tmp_path / "whole"), **kw))
    whole_final = whole.fit()["final"]
    half = ckpt.load_checkpoint(tmp_path / "whole" / "checkpoints" / "step_00000002.pt")
    assert "mae_decoder" in half
    ckpt.save_checkpoint(tmp_path / "resumed" / "checkpoints" / "step_00000002.pt", half)
    resumed = Trainer(TrainConfig(out=str(tmp_path / "resumed"), resume=True, **kw))
    resumed_final = resumed.fit()["final"]
    losses = sorted(k for k in whole_final if k.endswith("_loss"))
    assert "image_ssl_loss" in losses  # the MAE loss was trained and logged
    assert {k: resumed_final[k] for k in losses} == {k: whole_final[k] for k in losses}  # step 4, to the bit
    for module in ("model", "mae_decoder"):
        mine, theirs = getattr(resumed, "model"), getattr(whole, "model")
        if module != "model":
            mine, theirs = resumed.objectives.mae_decoder, whole.objectives.mae_decoder
        for k, v in theirs.state_dict().items():
            assert torch.equal(mine.state_dict()[k], v), (module, k)
