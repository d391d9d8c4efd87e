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
