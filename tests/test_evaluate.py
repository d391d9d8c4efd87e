import numpy as np
import pytest
import torch
from PIL import Image

from clipalign.factory import create_model_and_transforms, get_tokenizer
from clipalign.evaluate import evaluate, load_eval_set
from data_prep.evalsets import write_classification_set, write_retrieval_set


@pytest.fixture(scope="module")
def nano():
    torch.manual_seed(0)
    model, _, transform = create_model_and_transforms("ca-nano")
    return model.eval(), get_tokenizer("ca-nano"), transform


def _image(value):
    return Image.fromarray(np.full((32, 32, 3), value, np.uint8))


def test_classification_set_counts_and_skips_an_unreadable_image(nano, tmp_path):
    samples = [(_image(10 * i), i % 3) for i in range(8)] + [(b"not an image", 1)]
    write_classification_set(tmp_path / "cls", samples, ["a", "b", "c"], ["a photo of a {c}."], image_format="png")
    evalset = load_eval_set(tmp_path / "cls")
    assert evalset.task == "classification" and evalset.classnames == ["a", "b", "c"]
    result = evaluate(*nano, evalset, batch_size=4)
    assert result["n"] == 8 and result["skipped"] == {"undecodable_image": 1}
    m = result["metrics"]
    assert 0 <= m["acc1"] <= m["acc5"] == 1.0  # 3 classes: every label is in the top 5


def test_retrieval_set_with_several_captions_per_image(nano, tmp_path):
    samples = [(_image(30 * i), [f"caption {i}", f"another {i}"]) for i in range(5)]
    write_retrieval_set(tmp_path / "ret", samples)
    result = evaluate(*nano, load_eval_set(tmp_path / "ret"))
    assert result["n"] == 5 and result["n_texts"] == 10
    assert result["metrics"]["image_retrieval_recall@5"] == 1.0  # 5 images: all are in the top 5


def test_not_an_eval_set_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nshards.txt"):
        load_eval_set(tmp_path)
