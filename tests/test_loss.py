import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from clipalign.loss import ClipLoss, MlmLoss, QueueClipLoss, SigLipLoss, SimClrLoss, mlm_accuracy, mlm_hits
from clipalign.masking import IGNORE_INDEX


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


def test_mlm_accuracy_and_hits_leave_out_ignored_rows():
    logits = torch.eye(4)  # rows 2 and 3 are padding: counted, the accuracy would be 1/4
    targets = torch.tensor([0, 3, IGNORE_INDEX, IGNORE_INDEX])
    assert mlm_hits(logits, targets) == 1 and mlm_accuracy(logits, targets) == 0.5
    assert math.isnan(mlm_accuracy(logits, torch.full((4,), IGNORE_INDEX)))


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
    img, txt = _features(b=6, d=8, seed=2)
    got = SigLipLoss()(img, txt, torch.tensor(10.0), torch.tensor(-10.0))["contrastive_loss"].item()
    assert abs(got - reference_sigmoid_loss(img, txt, 10.0, -10.0)) < 1e-4


def reference_queue_info_nce(img, txt, scale, img_queue, txt_queue):
    """InfoNCE whose candidates are the batch plus the queue (MoCo), one row at a time."""
    total, n = 0.0, img.shape[0]
    texts, images = torch.cat([txt, txt_queue]), torch.cat([img, img_queue])
    for i in range(n):
        i2t = [scale * float(img[i] @ t) for t in texts]
        t2i = [scale * float(txt[i] @ m) for m in images]
        total += -i2t[i] + math.log(sum(math.exp(s) for s in i2t))
        total += -t2i[i] + math.log(sum(math.exp(s) for s in t2i))
    return total / (2 * n)


def test_queue_info_nce_matches_plain_reference():
    img, txt = _features(b=6)
    q_img, q_txt = _features(b=10, seed=1)
    scale = torch.tensor(12.0)
    got = QueueClipLoss()(img, txt, scale, q_img, q_txt)["contrastive_loss"].item()
    assert math.isclose(got, reference_queue_info_nce(img, txt, 12.0, q_img, q_txt), rel_tol=1e-5)


def test_queue_info_nce_with_an_empty_queue_is_clip_loss():
    img, txt = _features()
    empty = torch.zeros(0, img.shape[1])
    scale = torch.tensor(1 / 0.07)
    got = QueueClipLoss()(img, txt, scale, empty, empty)["contrastive_loss"]
    assert torch.allclose(got, ClipLoss()(img, txt, scale)["contrastive_loss"])


def reference_nt_xent(z1, z2, tau):
    """SimCLR's loss from the paper: l(i, j) = -log exp(s_ij/τ) / Σ_{k≠i} exp(s_ik/τ), mean over 2N views."""
    z = torch.cat([z1, z2])
    n2 = z.shape[0]
    total = 0.0
    for i in range(n2):
        j = (i + n2 // 2) % n2
        denom = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(n2) if k != i)
        total += -float(z[i] @ z[j]) / tau + math.log(denom)
    return total / n2


def test_simclr_loss_matches_the_papers_definition():
    z1, z2 = _features(b=5, d=8, seed=3)
    got = SimClrLoss(temperature=0.1, weight=0.5)(z1, z2)["image_ssl_loss"].item()
    assert math.isclose(got, 0.5 * reference_nt_xent(z1, z2, 0.1), rel_tol=1e-5)


def test_simclr_loss_prefers_matching_views():
    z1, _ = _features(b=8, d=16)
    noise = F.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(5)), dim=-1)
    close = SimClrLoss()(z1, F.normalize(z1 + 0.05 * noise, dim=-1))["image_ssl_loss"]
    far = SimClrLoss()(z1, noise)["image_ssl_loss"]
    assert close < far


def test_mlm_loss_split_over_parts_with_a_shared_count_sums_to_the_mean():
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(10, 7, generator=g), torch.randint(0, 7, (10,), generator=g)
    whole = MlmLoss(0.3)(logits, targets)["mlm_loss"]
    parts = MlmLoss(0.3)(logits[:4], targets[:4], 10)["mlm_loss"] + MlmLoss(0.3)(logits[4:], targets[4:], 10)["mlm_loss"]
    assert torch.allclose(whole, parts)


def test_mlm_hits_counts_as_argmax_does_ties_included():
    from clipalign.loss import mlm_hits

    gen = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 4, (300, 50), generator=gen).to(torch.bfloat16)  # many tied maxima
    targets = torch.randint(0, 50, (300,), generator=gen)
    targets[:100] = logits[:100].float().argmax(-1)
    assert mlm_hits(logits, targets) == int((logits.argmax(-1) == targets).sum())
    assert mlm_hits(logits, targets) >= 100


def _near_miss_features(b=64, d=32, seed=4):
    """bf16 features whose captions are near misses of one another (as captions that differ
    in one word are), the case where bf16 logits round the differences away."""
    img, txt = _features(b, d, seed)
    txt = F.normalize(txt[:1] + 0.1 * txt, dim=-1)
    img = F.normalize(txt + 0.05 * img, dim=-1)
    return img.bfloat16().requires_grad_(), txt.bfloat16().requires_grad_()


CONTRASTIVE = {
    "clip": (ClipLoss(), ()),
    "siglip": (SigLipLoss(), (torch.tensor(-10.0),)),
    "queue": (QueueClipLoss(), tuple(f.detach()[:16] for f in _near_miss_features())),
}


@pytest.mark.parametrize("name", CONTRASTIVE)
def test_contrastive_losses_score_in_fp32_under_bf16_autocast(name):
    loss, extra = CONTRASTIVE[name]
    img, txt = _near_miss_features()
    scale = torch.tensor(100.0, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss(img, txt, scale, *extra)["contrastive_loss"]
    fp32 = loss(img.float(), txt.float(), scale, *(e.float() for e in extra))["contrastive_loss"]
    assert got.dtype == torch.float32
    assert torch.allclose(got, fp32, rtol=1e-6)  # bf16 logits miss by 2 % here
    got.backward()
    assert img.grad.dtype == torch.bfloat16 and img.grad.abs().sum() > 0 and txt.grad.abs().sum() > 0
    assert scale.grad != 0
