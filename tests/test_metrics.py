import pytest
import torch
import torch.nn.functional as F

from clipalign.metrics import mean_per_class_recall, retrieval_recall, topk_accuracy


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
    perfect = retrieval_recall(img, txt, owner, (1,))
    assert perfect == {"image_retrieval_recall@1": 1.0, "text_retrieval_recall@1": 1.0}
    wrong = retrieval_recall(img, txt, (owner + 1) % 4, (1, 4))
    assert wrong["image_retrieval_recall@1"] == 0.0 and wrong["image_retrieval_recall@4"] == 1.0


def test_retrieval_recall_partial_hit_counts_any_correct_caption():
    img = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    # image 0's captions: one points at image 1 (wrong), one at image 0 (right)
    txt = F.normalize(torch.tensor([[0.1, 1.0], [1.0, 0.1], [0.0, 1.0]]), dim=-1)
    owner = torch.tensor([0, 0, 1])
    r = retrieval_recall(img, txt, owner, (1,))
    assert r["text_retrieval_recall@1"] == 1.0  # each image's best caption is one of its own
    assert abs(r["image_retrieval_recall@1"] - 2 / 3) < 1e-6  # the first caption retrieves image 1
