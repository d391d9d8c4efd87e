from PIL import Image

from clipalign.plots import confusion_matrix_png


def test_small_matrix_is_labelled_and_large_one_keeps_a_bounded_size(tmp_path):
    small = confusion_matrix_png([[3, 1], [0, 4]], ["cat", "dog"], tmp_path / "small.png", title="pets")
    classes = [f"class {i}" for i in range(300)]
    matrix = [[5 if i == j else 0 for j in range(300)] for i in range(300)]
    large = confusion_matrix_png(matrix, classes, tmp_path / "large.png")
    with Image.open(small) as a, Image.open(large) as b:
        assert a.format == b.format == "PNG"
        assert b.width < 3000 and b.height < 3000  # not 0.55 inch per class


def test_training_curves_from_a_run(tmp_path, capsys):
    import json

    from clipalign.cli import main

    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "loss": 4 / s, "contrastive_loss": 3 / s, "mlm_loss": 1 / s, "temperature": 0.07,
             "mlm_acc": s / 10, "samples_per_s": 100.0} for s in range(1, 11)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["plot", str(run)]) == 0
    with Image.open(run / "curves.png") as png:
        assert png.format == "PNG" and png.width > png.height  # four panels side by side
    (run / "metrics.jsonl").write_text("")
    assert main(["plot", str(run)]) == 2
    assert "empty" in capsys.readouterr().err


def test_a_figure_that_fails_half_written_leaves_no_file(tmp_path, monkeypatch):
    import pytest
    from matplotlib.figure import Figure

    def half_then_fail(self, fname, **kwargs):
        open(fname, "wb").write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", half_then_fail)
    with pytest.raises(OSError, match="plot.png"):
        confusion_matrix_png([[1]], ["a"], tmp_path / "plot.png")
    assert list(tmp_path.iterdir()) == []
