"""Evaluation metrics with CLIP_benchmark's definitions, as pure functions on tensors."""
from __future__ import annotations

import torch


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Fraction of rows whose target is among the ``k`` highest logits.

    Args:
        logits: (N, C) class scores.
        targets: (N,) class indices.

    Returns:
        ``{k: accuracy}``; ``k`` larger than C counts every row as a hit.
    """
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (N, k)
    hits = top == targets[:, None]
    return {k: hits[:, :k].any(dim=1).float().mean().item() for k in ks}


def mean_per_class_recall(preds: torch.Tensor, targets: torch.Tensor) -> float:
    """Recall averaged over the classes present in ``targets`` (sklearn's balanced accuracy)."""
    recalls = [(preds[targets == c] == c).float().mean() for c in targets.unique()]
    return torch.stack(recalls).mean().item()


def retrieval_recall(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: tuple[int, ...] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@k both ways, a hit when any correct item is in the top k.

    Args:
        image_features: (N_img, D) normalised.
        text_features: (N_txt, D) normalised.
        text_to_image: (N_txt,) index of the image each caption belongs to.

    Returns:
        ``image_retrieval_recall@k`` (text → image) and ``text_retrieval_recall@k``
        (image → text), CLIP_benchmark's names.
    """
    scores = text_features @ image_features.T  # (N_txt, N_img)
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(text_to_image)), text_to_image] = True
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = _any_hit_at_k(scores, positive, k)
        out[f"text_retrieval_recall@{k}"] = _any_hit_at_k(scores.T, positive.T, k)
    return out


def _any_hit_at_k(scores: torch.Tensor, positive: torch.Tensor, k: int) -> float:
    """(Q, N) scores and positives → fraction of queries with a positive in their top k."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return positive.gather(1, top).any(dim=1).float().mean().item()
