import math

import open_clip
import torch
import torch.nn.functional as F

from clipalign.loss import ClipLoss, MlmLoss, mlm_accuracy


def _features(b=8, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, d, generator=g), dim=-1), F.normalize(torch.randn(b, d, generator=g), dim=-1)


def reference_info_nce(img, txt, scale):
    """CLIP's pseudocode, one row at a time."""
    total = 0.0
    n = img.shape[0]
    for i in range(n):
        sims_i2t = [scale * float(img[i] @ txt[j]) for j in range(n)]
        sims_t2i = [scale * float(txt[i] @ img[j]) for j in range(n)]
        total += -sims_i2t[i] + math.log(sum(math.exp(s) for s in sims_i2t))
        total += -sims_t2i[i] + math.log(sum(math.exp(s) for s in sims_t2i))
    return total / (2 * n)


def test_info_nce_matches_plain_reference():
    img, txt = _features()
    scale = torch.tensor(1 / 0.07)
    got = ClipLoss()(img, txt, scale)["contrastive_loss"].item()
    assert abs(got - reference_info_nce(img, txt, scale.item())) < 1e-4


def test_info_nce_matches_open_clip():
    img, txt = _features(b=32, d=64, seed=1)
    scale = torch.tensor(14.3)
    ours = ClipLoss()(img, txt, scale)["contrastive_loss"]
    theirs = open_clip.loss.ClipLoss()(img, txt, scale)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_info_nce_is_low_for_matched_pairs_and_gradients_reach_the_temperature():
    img, _ = _features()
    scale = torch.tensor(10.0, requires_grad=True)
    loss_matched = ClipLoss()(img, img, scale)["contrastive_loss"]
    loss_shuffled = ClipLoss()(img, img.roll(1, 0), scale)["contrastive_loss"]
    assert loss_matched < loss_shuffled
    loss_matched.backward()
    assert scale.grad is not None and scale.grad != 0


def test_mlm_loss_is_weighted_cross_entropy():
    logits = torch.randn(5, 100)
    targets = torch.randint(0, 100, (5,))
    got = MlmLoss(weight=0.25)(logits, targets)["mlm_loss"]
    assert torch.allclose(got, 0.25 * F.cross_entropy(logits, targets))


def test_mlm_accuracy():
    logits = torch.eye(4)
    assert mlm_accuracy(logits, torch.tensor([0, 1, 2, 0])) == 0.75


def reference_sigmoid_loss(img, txt, scale, bias):
    """SigLIP's definition: -1/B sum_ij log sigmoid(z_ij (t x_i.y_j + b)), z_ij = 1 if i == j else -1."""
    total = 0.0
    n = img.shape[0]
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total += -math.log(1 / (1 + math.exp(-z * (scale * float(img[i] @ txt[j]) + bias))))
    return total / n


def test_sigmoid_loss_matches_plain_reference():
    from clipalign.loss import SigLipLoss

    img, txt = _features(b=6, d=8, seed=2)
    got = SigLipLoss()(img, txt, torch.tensor(10.0), torch.tensor(-10.0))["contrastive_loss"].item()
    assert abs(got - reference_sigmoid_loss(img, txt, 10.0, -10.0)) < 1e-4
