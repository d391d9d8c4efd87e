import torch

from clipalign.linear_probe import fit_logistic_regression, linear_probe


def _blobs(n_per_class, n_classes, dim, spread, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, dim, generator=torch.Generator().manual_seed(123)) * 3
    labels = torch.arange(n_classes).repeat_interleave(n_per_class)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=g), labels


def test_separable_classes_are_probed_perfectly():
    train_x, train_y = _blobs(30, 6, 16, 0.3, seed=0)
    test_x, test_y = _blobs(20, 6, 16, 0.3, seed=1)
    result = linear_probe(train_x, train_y, test_x, test_y, n_classes=6)
    assert result["metrics"]["acc1"] == 1.0 and result["metrics"]["mean_per_class_recall"] == 1.0
    assert result["n_train"] == 180


def test_random_labels_probe_near_chance():
    train_x, _ = _blobs(50, 4, 16, 1.0, seed=0)
    test_x, _ = _blobs(50, 4, 16, 1.0, seed=1)
    g = torch.Generator().manual_seed(7)
    train_y, test_y = torch.randint(0, 4, (200,), generator=g), torch.randint(0, 4, (200,), generator=g)
    result = linear_probe(train_x, train_y, test_x, test_y, n_classes=4)
    assert result["metrics"]["acc1"] < 0.4  # chance is 0.25
    assert result["metrics"]["acc5"] != result["metrics"]["acc5"]  # NaN: top-5 of 4 classes is undefined


def test_stronger_l2_shrinks_the_weights():
    x, y = _blobs(20, 3, 8, 0.5, seed=0)
    weak, _ = fit_logistic_regression(x, y, 3, l2=1e-6)
    strong, _ = fit_logistic_regression(x, y, 3, l2=1.0)
    assert strong.norm() < weak.norm()
    assert fit_logistic_regression(x, y, 3, l2=1e-4)[0].equal(fit_logistic_regression(x, y, 3, l2=1e-4)[0])
