"""open_clip ↔ Hugging Face CLIP: one weight table, exact both ways, refusals that name what is missing."""
from __future__ import annotations

import open_clip
import pytest
import torch
from transformers import CLIPModel

import clipalign.factory  # noqa: F401  (registers the project's configs with open_clip)
from clipalign.hf_convert import (
    UnsupportedArchitecture,
    hf_config,
    hf_to_open_clip,
    open_clip_config,
    open_clip_to_hf,
)

EOT = 49407


def _features(output):
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _pair(cfg):
    torch.manual_seed(0)
    oc = open_clip.model.CLIP(**cfg).eval()
    hf = CLIPModel(hf_config(cfg)).eval()
    hf.load_state_dict(open_clip_to_hf(oc.state_dict()))
    return oc, hf


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_hf_model_gives_open_clips_embeddings(quick_gelu):
    cfg = {**open_clip.get_model_config("ca-nano"), "quick_gelu": quick_gelu}
    oc, hf = _pair(cfg)
    ids = open_clip.get_tokenizer("ca-nano")(["a red circle", "a photo of a blue star on the left", "x"])
    mask = (torch.arange(ids.shape[1])[None] <= (ids == EOT).int().argmax(1)[:, None]).long()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(_features(hf.get_image_features(pixel_values=images)), oc.encode_image(images),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(_features(hf.get_text_features(input_ids=ids, attention_mask=mask)),
                                   oc.encode_text(ids), atol=1e-5, rtol=1e-5)
    assert open_clip_config(hf.config) == {**{k: v for k, v in cfg.items() if k != "quick_gelu"},
                                           **({"quick_gelu": True} if quick_gelu else {}),
                                           "vision_cfg": {**cfg["vision_cfg"], "mlp_ratio": 4.0},
                                           "text_cfg": {**cfg["text_cfg"], "mlp_ratio": 4.0}}


def test_hf_to_open_clip_to_hf_is_the_identity():
    torch.manual_seed(1)
    hf = CLIPModel(hf_config(open_clip.get_model_config("ca-nano")))
    state = {k: v for k, v in hf.state_dict().items() if not k.endswith("position_ids")}
    back = open_clip_to_hf(hf_to_open_clip(state))
    assert back.keys() == state.keys() and all(torch.equal(back[k], v) for k, v in state.items())
    oc = open_clip.model.CLIP(**open_clip_config(hf.config))
    oc.load_state_dict(hf_to_open_clip(state))  # strict: every open_clip weight is there


@pytest.mark.parametrize("name,what", [("ca-tiny", "ResNet"), ("ca-coca-nano", "attentional_pool"),
                                       ("RN50", "ResNet")])
def test_what_hf_clip_cannot_express_is_named(name, what):
    with pytest.raises(UnsupportedArchitecture, match=what):
        hf_config(open_clip.get_model_config(name))


def test_train_starts_from_a_local_hf_clip_folder(tmp_path):
    from clipalign.factory import create_model
    from clipalign.train import Trainer
    from clipalign.train_config import TrainConfig
    from toydata import write_toy_shards

    torch.manual_seed(2)
    hf = CLIPModel(hf_config(open_clip.get_model_config("ca-nano"))).eval()
    hf.save_pretrained(tmp_path / "hf")
    model = create_model("ca-nano", pretrained=str(tmp_path / "hf")).eval()
    ids = open_clip.get_tokenizer("ca-nano")(["a red circle", "x"])
    mask = (torch.arange(ids.shape[1])[None] <= (ids == EOT).int().argmax(1)[:, None]).long()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # identical embeddings before any training
        torch.testing.assert_close(model.encode_image(images), _features(hf.get_image_features(pixel_values=images)),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.encode_text(ids), _features(hf.get_text_features(input_ids=ids,
                                                                                           attention_mask=mask)),
                                   atol=1e-5, rtol=1e-5)
    data = write_toy_shards(tmp_path / "shards", n=32, per_shard=32)[0].rsplit("/", 1)[0]
    summary = Trainer(TrainConfig(data=data, out=str(tmp_path / "run"), model="ca-nano", pretrained=str(tmp_path / "hf"),
                                  steps=2, batch_size=8, warmup=1, workers=0, shuffle_buffer=8, precision="fp32",
                                  tensorboard=False)).fit()
    assert summary["steps_this_run"] == 2
    with pytest.raises(ValueError, match="is not a ca-small"):
        create_model("ca-small", pretrained=str(tmp_path / "hf"))
