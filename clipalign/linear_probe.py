"""Linear probe: multinomial logistic regression on frozen image features.

The standard measure of a representation's quality (CLIP's linear-probe evaluation): fit on
a train split's features, report on the test split. The L2 strength is chosen on a held-out
fifth of the train split from a small grid, then the probe is refit on the whole train split.
Full-batch L-BFGS makes every fit deterministic.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from clipalign.metrics import mean_per_class_recall, topk_accuracy

L2_GRID = (1e-6, 1e-4, 1e-2)


def fit_logistic_regression(
    features: torch.Tensor, labels: torch.Tensor, n_classes: int, l2: float, max_iter: int = 200
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (D, C) and bias (C,) minimising cross-entropy + ``l2`` × ||W||² on (N, D) features."""
    weight = torch.zeros(features.shape[1], n_classes, requires_grad=True)
    bias = torch.zeros(n_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ weight + bias, labels) + l2 * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def _accuracy(weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> float:
    return ((features @ weight + bias).argmax(1) == labels).float().mean().item()


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    n_classes: int,
    l2_grid: tuple[float, ...] = L2_GRID,
    seed: int = 0,
) -> dict[str, Any]:
    """Fit on the train split, report acc1, acc5 and mean per-class recall on the test split.

    Args:
        train_features: (N_train, D); test_features: (N_test, D).
        train_labels, test_labels: class indices.
    """
    order = torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, len(order) // 5)
    val, fit = order[:n_val], order[n_val:]
    scores = {l2: _accuracy(*fit_logistic_regression(train_features[fit], train_labels[fit], n_classes, l2),
                            train_features[val], train_labels[val]) for l2 in l2_grid}
    best = max(l2_grid, key=lambda l2: (scores[l2], l2))  # ties: the stronger regulariser
    weight, bias = fit_logistic_regression(train_features, train_labels, n_classes, best)
    logits = test_features @ weight + bias
    acc = topk_accuracy(logits, test_labels, (1, 5))
    return {
        "metrics": {
            "acc1": acc[1],
            "acc5": acc[5] if n_classes >= 5 else float("nan"),
            "mean_per_class_recall": mean_per_class_recall(logits.argmax(1), test_labels),
        },
        "l2": best,
        "validation_acc1": scores,
        "n_train": len(train_labels),
    }
