"""Inference-only image towers: batch norms folded into the convolutions before them give the
same features, and only where folding is exact."""
from __future__ import annotations

import pytest
import torch
from PIL import Image
from torch import nn

from clipalign.factory import create_model_and_transforms
from clipalign.inference import conv_bn_pairs, fold_batch_norms, image_encoder


def _scramble_statistics(module: nn.Module, seed: int = 0) -> None:
    """Running statistics and affine weights far from a fresh batch norm's identity map."""
    g = torch.Generator().manual_seed(seed)
    for bn in (m for m in module.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.5)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) * 2 + 0.1)
        bn.weight.data.copy_(torch.randn(bn.num_features, generator=g))
        bn.bias.data.copy_(torch.randn(bn.num_features, generator=g))


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model, _, transform = create_model_and_transforms("ca-tiny", mlm_head=False)  # open_clip's ModifiedResNet
    _scramble_statistics(model.clip.visual)
    return model.eval(), transform


def test_a_folded_resnet_tower_gives_the_features_of_the_plain_one(resnet, monkeypatch):
    from clipalign import inference

    model, _ = resnet
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.clip.visual.modules())
    folded = []
    fold = inference.fold_batch_norms
    monkeypatch.setattr(inference, "fold_batch_norms", lambda m: folded.append(fold(m)) or folded[-1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randn(5, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.encode_image(images, normalize=True)
        got = image_encoder(model)(images)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert folded == [norms] and norms > 0  # every batch norm of the tower follows a conv
    state = model.state_dict()  # the model keeps its own batch norms and weights
    assert state.keys() == before.keys() and all(torch.equal(state[k], v) for k, v in before.items())


def test_image_features_embeds_the_transformed_images_as_encode_image_does(resnet):
    from clipalign.embedding import image_features

    model, transform = resnet
    pictures = [Image.new("RGB", (40 + 7 * i, 50), (30 * i, 200 - 20 * i, 90)) for i in range(6)]
    feats, payloads = image_features(model, transform, [(p, i) for i, p in enumerate(pictures)], batch_size=4)
    with torch.no_grad():
        expected = model.encode_image(torch.stack([transform(p) for p in pictures]), normalize=True)
    assert payloads == list(range(6))
    torch.testing.assert_close(feats, expected, rtol=1e-5, atol=1e-5)


class _Mixed(nn.Module):
    """conv→bn (foldable); conv→relu→bn; a conv whose output is also added back; a conv called twice."""

    def __init__(self):
        super().__init__()
        self.a, self.a_bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.b, self.b_bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.c, self.c_bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.shared, self.shared_bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a_bn(self.a(x))
        x = self.b_bn(torch.relu(self.b(x)))
        y = self.c(x)
        x = self.c_bn(y) + y
        return self.shared_bn(self.shared(self.shared(x)))


def test_only_a_batch_norm_alone_on_its_convolutions_output_is_folded():
    torch.manual_seed(0)
    module = _Mixed()
    _scramble_statistics(module)
    module.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = module(x)
        assert conv_bn_pairs(module) == [("a", "a_bn")]
        assert fold_batch_norms(module) == 1
        torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-5)
    assert isinstance(module.a_bn, nn.Identity) and isinstance(module.b_bn, nn.BatchNorm2d)


def test_a_training_tower_is_never_folded(resnet):
    model, _ = resnet
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norms(_Mixed().train())
    state = {k: v.clone() for k, v in model.state_dict().items()}  # a training pass moves the running statistics
    model.train()
    try:
        images = torch.randn(4, 3, model.image_size, model.image_size)
        with torch.no_grad():  # batch statistics: only the plain tower computes them
            torch.testing.assert_close(image_encoder(model)(images), model.encode_image(images, normalize=True),
                                       rtol=0, atol=0)
    finally:
        model.load_state_dict(state)
        model.eval()
