import pytest
import torch
import torch.nn.functional as F

from clipalign.metrics import (
    average_precision,
    confusion_matrix,
    macro_f1,
    mean_per_class_recall,
    retrieval_metrics,
    topk_accuracy,
)


def recalls(img, txt, owner, ks):
    return {k: v for k, v in retrieval_metrics(img, txt, owner, ks).items() if "recall@" in k}


def test_topk_accuracy_known_answers():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.2, 0.7], [0.5, 0.3, 0.2]])
    targets = torch.tensor([0, 1, 2])
    acc = topk_accuracy(logits, targets, (1, 2, 5))
    assert acc[1] == pytest.approx(1 / 3) and acc[2] == pytest.approx(2 / 3) and acc[5] == 1.0


def test_mean_per_class_recall_weights_classes_equally():
    targets = torch.tensor([0, 0, 0, 0, 1])
    preds = torch.tensor([0, 0, 0, 0, 0])
    assert mean_per_class_recall(preds, targets) == 0.5  # accuracy would be 0.8


def test_retrieval_recall_perfect_and_reversed():
    img = torch.eye(4)
    txt = torch.eye(4).repeat_interleave(2, 0)  # two captions per image
    owner = torch.arange(4).repeat_interleave(2)
    perfect = recalls(img, txt, owner, (1,))
    assert perfect == {"image_retrieval_recall@1": 1.0, "text_retrieval_recall@1": 1.0}
    wrong = recalls(img, txt, (owner + 1) % 4, (1, 4))
    assert wrong["image_retrieval_recall@1"] == 0.0 and wrong["image_retrieval_recall@4"] == 1.0


def test_retrieval_recall_partial_hit_counts_any_correct_caption():
    img = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    # image 0's captions: one points at image 1 (wrong), one at image 0 (right)
    txt = F.normalize(torch.tensor([[0.1, 1.0], [1.0, 0.1], [0.0, 1.0]]), dim=-1)
    owner = torch.tensor([0, 0, 1])
    r = recalls(img, txt, owner, (1,))
    assert r["text_retrieval_recall@1"] == 1.0  # each image's best caption is one of its own
    assert abs(r["image_retrieval_recall@1"] - 2 / 3) < 1e-6  # the first caption retrieves image 1


def test_confusion_matrix_and_macro_f1_known_answers():
    targets = torch.tensor([0, 0, 1, 1, 2])
    preds = torch.tensor([0, 1, 1, 1, 0])
    assert confusion_matrix(preds, targets, 3).tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    # per class F1: 0 -> 2*1/(2+1+1) = 0.5, 1 -> 2*2/(4+1+0) = 0.8, 2 -> 0
    assert macro_f1(preds, targets) == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_blocked_retrieval_equals_one_block():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(50, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(120, 8, generator=g), dim=-1)
    owner = torch.randint(0, 50, (120,), generator=g)
    one = retrieval_metrics(img, txt, owner, (1, 5, 10), block_elements=1 << 20)
    blocked = retrieval_metrics(img, txt, owner, (1, 5, 10), block_elements=7 * 120)
    assert one == blocked  # ranks included; their values are checked on known answers below
    assert {"image_retrieval_median_rank", "text_retrieval_mean_rank"} <= one.keys()


def test_ranks_of_a_perfect_and_a_reversed_ranking():
    img = torch.eye(3)
    perfect = retrieval_metrics(img, img, torch.arange(3), (1,))
    assert perfect["image_retrieval_mean_rank"] == perfect["text_retrieval_median_rank"] == 1.0
    worst = retrieval_metrics(img, -img + 1, torch.arange(3), (1,))  # each caption matches every other image
    assert worst["image_retrieval_mean_rank"] == 3.0 and worst["image_retrieval_recall@1"] == 0.0


def test_average_precision_known_answers():
    # class 0: positives ranked 1st and 3rd -> (1/1 + 2/3) / 2; class 1: no positives -> 0;
    # class 2: the only positive ranked last of 3 -> 1/3.
    scores = torch.tensor([[0.9, 0.1, 0.2], [0.5, 0.2, 0.3], [0.4, 0.3, 0.1]])
    targets = torch.tensor([[1, 0, 0], [0, 0, 0], [1, 0, 1]])
    ap = average_precision(scores, targets)
    assert ap.tolist() == pytest.approx([(1 + 2 / 3) / 2, 0.0, 1 / 3])


def test_random_embeddings_score_at_chance():
    g = torch.Generator().manual_seed(0)
    n = 2000
    img = F.normalize(torch.randn(n, 64, generator=g), dim=-1)
    txt = F.normalize(torch.randn(n, 64, generator=g), dim=-1)
    m = retrieval_metrics(img, txt, torch.arange(n), (10, 100))
    assert abs(m["image_retrieval_recall@100"] - 100 / n) < 0.02 and abs(m["text_retrieval_recall@10"] - 10 / n) < 0.01
    assert abs(m["image_retrieval_mean_rank"] - (n + 1) / 2) < 0.05 * n  # uniform ranks
    logits = torch.randn(n, 10, generator=g)
    targets = torch.randint(0, 10, (n,), generator=g)
    acc = topk_accuracy(logits, targets, (1, 5))
    assert abs(acc[1] - 0.1) < 0.02 and abs(acc[5] - 0.5) < 0.04
    assert abs(mean_per_class_recall(logits.argmax(1), targets) - 0.1) < 0.02


def test_adversarial_classifier_scores_zero():
    targets = torch.arange(6).repeat(5)
    logits = -F.one_hot(targets, 6).float()  # the true class always scores lowest
    acc = topk_accuracy(logits, targets, (1, 5))
    assert acc == {1: 0.0, 5: 0.0}
    assert mean_per_class_recall(logits.argmax(1), targets) == 0.0 and macro_f1(logits.argmax(1), targets) == 0.0


def test_macro_f1_and_average_precision_match_sklearn():
    from sklearn.metrics import average_precision_score, f1_score

    g = torch.Generator().manual_seed(3)
    targets, preds = torch.randint(0, 5, (300,), generator=g), torch.randint(0, 5, (300,), generator=g)
    preds[:150] = targets[:150]
    assert macro_f1(preds, targets) == pytest.approx(f1_score(targets, preds, average="macro"))
    scores = torch.rand(300, 4, generator=g)
    multi_hot = (torch.rand(300, 4, generator=g) < 0.3).int()
    ours = average_precision(scores, multi_hot)
    theirs = [average_precision_score(multi_hot[:, c], scores[:, c]) for c in range(4)]
    assert ours.tolist() == pytest.approx(theirs, abs=1e-6)
    perfect = average_precision(multi_hot.float(), multi_hot)
    assert perfect.tolist() == pytest.approx([1.0] * 4)
