import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from clipalign.evaluate import evaluate, load_eval_set
from clipalign.factory import create_model_and_transforms, get_tokenizer
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
    confusion = result["confusion_matrix"]
    assert m["acc1"] == pytest.approx(sum(confusion[i][i] for i in range(3)) / 8)
    assert math.isnan(m["acc5"])  # top-5 of 3 classes is undefined


def test_retrieval_set_with_several_captions_per_image(nano, tmp_path):
    samples = [(_image(30 * i), [f"caption {i}", f"another {i}"]) for i in range(5)]
    write_retrieval_set(tmp_path / "ret", samples)
    result = evaluate(*nano, load_eval_set(tmp_path / "ret"))
    assert result["n"] == 5 and result["n_texts"] == 10
    assert "mlm_acc" in result["metrics"]  # the model has an MLM head; its value is tested below


def test_not_an_eval_set_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nshards.txt"):
        load_eval_set(tmp_path)


COLOURS = ("red", "green", "blue")


class StubModel(torch.nn.Module):
    """Features whose answers are obvious. An image is its dominant channel, plus a constant;
    a text is the colour it names, plus 0.01 × its length (which breaks ties between captions
    of one colour in image → text ranking, and changes nothing in text → image ranking)."""

    def encode_image(self, images, normalize=False):
        colour = F.one_hot(images.mean(dim=(2, 3)).argmax(1), 3).float()
        return torch.cat([colour, torch.full((len(images), 1), 0.1)], dim=1)

    def encode_text(self, ids, normalize=False):
        return torch.cat([F.one_hot(ids[:, 0], 3).float(), 0.01 * ids[:, 1:].float()], dim=1)


def stub_tokenizer(texts):
    return torch.tensor([[next(i for i, c in enumerate(COLOURS) if c in t), len(t)] for t in texts])


def _solid(colour):
    rgb = [0, 0, 0]
    rgb[COLOURS.index(colour)] = 255
    return Image.fromarray(np.full((8, 8, 3), rgb, np.uint8))


TO_TENSOR = torchvision.transforms.ToTensor()


def test_zero_shot_classification_known_answer(tmp_path):
    classnames = ["blue", "red", "green"]  # not in channel order: labels must follow this file
    samples = [(_solid(c), classnames.index(c)) for c in ["red", "green", "blue", "red"]]
    samples.append((_solid("green"), classnames.index("blue")))  # mislabelled: a sure miss
    write_classification_set(tmp_path / "cls", samples, classnames, ["a {c} thing."])
    result = evaluate(StubModel(), stub_tokenizer, TO_TENSOR, load_eval_set(tmp_path / "cls"))
    m = result["metrics"]
    assert m["acc1"] == pytest.approx(4 / 5)
    assert m["mean_per_class_recall"] == pytest.approx((1 / 2 + 1 + 1) / 3)  # "blue": 1 of 2 right
    assert result["confusion_matrix"] == [[1, 0, 1], [0, 2, 0], [0, 0, 1]]  # rows: true blue, red, green


def test_zero_shot_retrieval_known_answer_and_direction_names(tmp_path):
    samples = [(_solid("red"), ["a red thing", "red"]), (_solid("green"), ["a green thing"]),
               (_solid("blue"), ["a red caption on a blue image"])]
    write_retrieval_set(tmp_path / "ret", samples)
    m = evaluate(StubModel(), stub_tokenizer, TO_TENSOR, load_eval_set(tmp_path / "ret"), ks=(1, 3))["metrics"]
    # text -> image ("image retrieval"): the blue image's red caption finds the red image first.
    assert m["image_retrieval_recall@1"] == pytest.approx(3 / 4) and m["image_retrieval_recall@3"] == 1.0
    assert m["image_retrieval_mean_rank"] == pytest.approx((1 + 1 + 1 + 2) / 4)
    # image -> text ("text retrieval"): the red image's best own caption is beaten by the blue
    # image's longer red caption; the blue image still ranks its own caption first.
    assert m["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert m["text_retrieval_mean_rank"] == pytest.approx((2 + 1 + 1) / 3) and m["text_retrieval_median_rank"] == 1.0


def test_heldout_mlm_accuracy_counts_every_masked_token(nano, monkeypatch):
    from clipalign.evaluate import heldout_mlm_accuracy

    model, tok, _ = nano
    texts = ["a small red triangle at the top left", "a blue circle next to a yellow square"] * 300
    seen = []

    def oracle(masked, labels, shift):
        targets = labels[labels != -100]
        seen.append(targets.numel())
        return F.one_hot((targets + shift) % model.vocab_size, model.vocab_size).float(), targets

    monkeypatch.setattr(model, "mlm_logits", lambda m, l: oracle(m, l, 0))
    assert heldout_mlm_accuracy(model, tok, texts, batch_size=256) == 1.0
    assert len(seen) == 3 and sum(seen) >= len(texts)  # 3 batches, at least one mask per caption
    monkeypatch.setattr(model, "mlm_logits", lambda m, l: oracle(m, l, 1))
    assert heldout_mlm_accuracy(model, tok, texts) == 0.0


def test_multilabel_set_reports_mean_average_precision(tmp_path):
    samples = [(_solid("red"), [1, 0, 0]), (_solid("green"), [0, 1, 1]), (_solid("blue"), [0, 0, 1])]
    write_classification_set(tmp_path / "ml", samples, list(COLOURS), ["a {c} thing."], multilabel=True)
    evalset = load_eval_set(tmp_path / "ml")
    assert evalset.task == "multilabel"
    result = evaluate(StubModel(), stub_tokenizer, TO_TENSOR, evalset)
    ap = result["average_precision_per_class"]
    assert ap["red"] == 1.0 and ap["green"] == 1.0
    # "blue": the blue image ranks 1st; the green image (also blue-labelled) ties with the red
    # one at score 0 and the stable sort keeps input order, so it ranks 3rd: (1/1 + 2/3) / 2.
    assert ap["blue"] == pytest.approx((1 + 2 / 3) / 2)
    assert result["metrics"]["mean_average_precision"] == pytest.approx(sum(ap.values()) / 3)


def test_the_eval_report_names_every_set_and_is_written_whole(tmp_path):
    from clipalign.eval_report import eval_report, report_table

    classnames = ["red", "green", "blue"]
    for parent in ("a", "b"):  # two sets called "val": the report tells them apart by their parents
        samples = [(_solid(c), classnames.index(c)) for c in ["red", "green", "blue", "green"]]
        write_classification_set(tmp_path / parent / "val", samples, classnames, ["a {c} thing."])
        write_classification_set(tmp_path / parent / "val", samples, classnames, ["a {c} thing."], split="train")
    write_retrieval_set(tmp_path / "ret", [(_solid("red"), ["a red thing"]), (_solid("blue"), ["a blue thing"])])
    sets = [load_eval_set(tmp_path / p) for p in ("a/val", "b/val", "ret")]
    meta = {"path": "/runs/stub", "model_name": "stub", "step": 3}
    out, plots = tmp_path / "report" / "eval.json", tmp_path / "plots"
    report = eval_report(StubModel(), stub_tokenizer, TO_TENSOR, meta, sets, out=out, plot_dir=plots, ks=(1,),
                         linear_probe=True)
    assert out.read_text() == json.dumps(report, indent=2) + "\n"  # (text: acc@5 of 3 classes is NaN)
    assert [p.name for p in out.parent.iterdir()] == ["eval.json"]  # written whole: no temporary file left
    assert (report["checkpoint"], report["model"], report["step"]) == ("/runs/stub", "stub", 3)
    assert list(report["results"]) == ["a/val", "b/val", "ret"]
    val = report["results"]["a/val"]
    assert (val["dataset"], val["model"], val["pretrained"], val["path"]) == \
        ("wds/val", "stub", "/runs/stub", str(tmp_path / "a" / "val"))
    assert val["metrics"]["acc1"] == 1.0 and val["metrics"]["lp_acc1"] == val["linear_probe"]["metrics"]["acc1"]
    assert val["confusion_png"] == str(plots / "a/val_confusion.png")
    assert sorted(str(p.relative_to(plots)) for p in plots.rglob("*.png")) == ["a/val_confusion.png",
                                                                               "b/val_confusion.png"]
    assert report["results"]["ret"]["metrics"]["image_retrieval_recall@1"] == 1.0
    assert "linear_probe" not in report["results"]["ret"] and "confusion_png" not in report["results"]["ret"]
    table = report_table(report).splitlines()
    assert [line.split()[0] for line in table] == ["a/val", "b/val", "ret"] and "linear probe" in table[0]
