"""Image-conditioned MLM: the fusion head's shapes, where its gradient goes, and that export drops it."""
from __future__ import annotations

import pytest
import torch

from clipalign.factory import create_model, get_tokenizer
from clipalign.fusion import image_features_and_tokens
from clipalign.masking import IGNORE_INDEX, mask_tokens

TOK = get_tokenizer("ca-nano")


def _batch(model, n=3):
    torch.manual_seed(0)
    images = torch.randn(n, 3, model.image_size, model.image_size)
    ids = TOK(["a red circle", "a blue star on the left", "green"][:n])
    masked, labels = mask_tokens(ids, mask_id=model.mask_id, eot_id=TOK.eot_token_id, random_high=TOK.sot_token_id,
                                 generator=torch.Generator().manual_seed(0))
    return images, ids, masked, labels


@pytest.mark.parametrize("name,tokens", [("ca-nano", 16), ("ca-tiny", 4)])  # ViT patches; ResNet's 2x2 map
def test_one_image_pass_gives_the_features_and_the_tokens(name, tokens):
    model = create_model(name, mlm_condition="image").eval()
    images = torch.randn(2, 3, model.image_size, model.image_size)
    features, toks = image_features_and_tokens(model.clip.visual, images)
    assert toks.shape[:2] == (2, tokens)
    torch.testing.assert_close(features, model.clip.visual(images))  # the same pass encode_image makes
    out = model(images, TOK(["a", "b"]), image_tokens=True)
    torch.testing.assert_close(out["image_features"], model.encode_image(images, normalize=True))


@pytest.mark.parametrize("name", ["ca-nano", "ca-tiny"])
def test_the_mlm_loss_alone_trains_the_image_tower(name):
    model = create_model(name, mlm_condition="image")
    images, ids, masked, labels = _batch(model)
    out = model(images, ids, masked, labels)
    assert out["mlm_logits"].shape == (int((labels != IGNORE_INDEX).sum()), model.vocab_size)
    torch.nn.functional.cross_entropy(out["mlm_logits"], out["mlm_targets"]).backward()
    visual = [p.grad for p in model.clip.visual.parameters() if p.grad is not None]
    assert visual and sum(float(g.abs().sum()) for g in visual) > 0
    assert model.mlm_fusion.image_proj.weight.grad.abs().sum() > 0


def test_the_image_changes_the_prediction_only_when_conditioned():
    conditioned, plain = create_model("ca-nano", mlm_condition="image"), create_model("ca-nano")
    images, ids, masked, labels = _batch(conditioned)
    with torch.no_grad():
        for model, changes in ((conditioned, True), (plain, False)):
            a = model(images, ids, masked, labels)["mlm_logits"]
            b = model(images.flip(0), ids, masked, labels)["mlm_logits"]
            assert (not torch.allclose(a, b)) == changes


def test_a_conditioned_head_without_image_tokens_is_refused():
    model = create_model("ca-nano", mlm_condition="image")
    _, _, masked, labels = _batch(model)
    with pytest.raises(ValueError, match="image tokens"):
        model.mlm_logits(masked, labels)
    with pytest.raises(ValueError, match="needs the MLM head"):
        create_model("ca-nano", mlm_head=False, mlm_condition="image")


def test_checkpoint_round_trip_and_export_drop_the_fusion(tmp_path):
    from clipalign.checkpoint import load_model, save_checkpoint
    from clipalign.export import export_open_clip

    model = create_model("ca-nano", mlm_condition="image", fusion_layers=2)
    save_checkpoint(tmp_path / "c.pt", {"model_name": "ca-nano", "step": 1, "model": model.state_dict()})
    loaded, _, _, _ = load_model(tmp_path / "c.pt")
    assert len(loaded.mlm_fusion.blocks) == 2
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    export_open_clip(tmp_path / "c.pt", tmp_path / "export")
    from safetensors.torch import load_file

    state = load_file(next((tmp_path / "export").glob("*.safetensors")))
    assert state and not any("fusion" in k or "mlm" in k for k in state)


def test_retrieval_eval_of_a_conditioned_model_leaves_out_the_text_only_mlm_accuracy(tmp_path):
    import numpy as np
    from PIL import Image

    from clipalign.evaluate import evaluate, load_eval_set
    from data_prep.evalsets import write_retrieval_set

    write_retrieval_set(tmp_path / "ret", [(Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)), [f"c {i}"])
                                           for i in range(4)])
    model = create_model("ca-nano", mlm_condition="image").eval()
    from torchvision import transforms as T

    result = evaluate(model, TOK, T.ToTensor(), load_eval_set(tmp_path / "ret"))
    assert result["n"] == 4 and "image_retrieval_recall@1" in result["metrics"] and "mlm_acc" not in result["metrics"]
