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


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(C, C) counts: row = true class, column = predicted class."""
    flat = targets.long() * n_classes + preds.long()
    return torch.bincount(flat, minlength=n_classes * n_classes).view(n_classes, n_classes)


def mean_per_class_recall(preds: torch.Tensor, targets: torch.Tensor) -> float:
    """Recall averaged over the classes present in ``targets`` (sklearn's balanced accuracy)."""
    recalls = [(preds[targets == c] == c).float().mean() for c in targets.unique()]
    return torch.stack(recalls).mean().item()


def macro_f1(preds: torch.Tensor, targets: torch.Tensor) -> float:
    """F1 averaged over the classes seen in ``targets`` or ``preds`` (sklearn's ``average="macro"``)."""
    scores = []
    for c in torch.cat([targets, preds]).unique():
        tp = ((preds == c) & (targets == c)).sum().item()
        fp = ((preds == c) & (targets != c)).sum().item()
        fn = ((preds != c) & (targets == c)).sum().item()
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores)


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Average precision of each class of a multi-label task.

    For class c, the mean over its positive samples of the precision at their rank when all
    samples are sorted by score (ties in sort order); a class without positives scores 0.

    Args:
        scores: (N, C) class scores.
        targets: (N, C) multi-hot ground truth.

    Returns:
        (C,) average precisions; their mean is CLIP_benchmark's ``mean_average_precision``.
    """
    order = scores.argsort(dim=0, descending=True, stable=True)
    hits = targets.float().gather(0, order)  # (N, C): positives in rank order
    ranks = torch.arange(1, scores.shape[0] + 1, dtype=torch.float32)[:, None]
    precision = hits.cumsum(dim=0) / ranks
    return (precision * hits).sum(dim=0) / hits.sum(dim=0).clamp(min=1)


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: tuple[int, ...] = (1, 5, 10),
    block_elements: int = 1 << 24,
) -> dict[str, float]:
    """Recall@k, mean and median rank, both ways; an image may own several captions.

    A query is a hit at k when any of its correct items is in its top k (CLIP_benchmark's
    definition); its rank is 1 + the number of items scored above its best correct item.
    Similarities are computed a block of queries at a time, about ``block_elements`` scores per
    block (64 MB of float32 by default), so memory stays bounded whatever the set's size.

    Args:
        image_features: (N_img, D) normalised.
        text_features: (N_txt, D) normalised.
        text_to_image: (N_txt,) index of the image each caption belongs to.

    Returns:
        ``image_retrieval_*`` (text → image) and ``text_retrieval_*`` (image → text) keys:
        ``recall@k`` for each k, ``mean_rank`` and ``median_rank``.
    """
    image_ids = torch.arange(image_features.shape[0])
    out = {}
    for prefix, queries, items, query_group, item_group in (
        ("image_retrieval", text_features, image_features, text_to_image, image_ids),
        ("text_retrieval", image_features, text_features, image_ids, text_to_image),
    ):
        block_size = max(1, block_elements // max(1, items.shape[0]))
        stats = _ranking(queries, items, query_group, item_group, ks, block_size)
        out.update({f"{prefix}_{name}": value for name, value in stats.items()})
    return out


def _ranking(
    queries: torch.Tensor,
    items: torch.Tensor,
    query_group: torch.Tensor,
    item_group: torch.Tensor,
    ks: tuple[int, ...],
    block_size: int,
) -> dict[str, float]:
    """Hits at each k and ranks of ``queries`` (Q, D) against ``items`` (N, D); item i is a
    correct answer for query q when ``item_group[i] == query_group[q]``."""
    n_queries, n_items = queries.shape[0], items.shape[0]
    hits = dict.fromkeys(ks, 0)
    ranks = []
    for start in range(0, n_queries, block_size):
        scores = queries[start : start + block_size] @ items.T  # (b, N)
        positive = query_group[start : start + block_size, None] == item_group[None, :]
        top = scores.topk(min(max(ks), n_items), dim=1).indices
        top_positive = positive.gather(1, top)
        for k in ks:
            hits[k] += int(top_positive[:, :k].any(dim=1).sum())
        best = torch.where(positive, scores, float("-inf")).max(dim=1).values
        ranks.append((scores > best[:, None]).sum(dim=1) + 1)
    rank = torch.cat(ranks).double()
    stats = {f"recall@{k}": hits[k] / n_queries for k in ks}
    stats["mean_rank"] = rank.mean().item()
    stats["median_rank"] = rank.median().item() if n_queries % 2 else rank.quantile(0.5).item()
    return stats
