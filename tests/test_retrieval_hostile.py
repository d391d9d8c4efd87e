"""An index folder and queries that cannot be trusted: files swapped or named from outside the
folder, edited identities, bounds on k and on text, and query files that are not files."""
import json
import shutil

import numpy as np
import pytest

from clipalign.cli import main
from clipalign.formats.folders import IndexFolder
from retrieval.engine import MAX_K, open_engine
from retrieval.identity import ENDS, WHOLE, check_digest, file_digest
from retrieval.index import load_index
from tests.hostile_inputs import fifo
from tests.retrieval_toy import make_checkpoint, make_index


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    return make_index(tmp_path_factory.mktemp("hostile"), n=48)


@pytest.fixture(scope="module")
def other(tmp_path_factory, index):
    """An index of the same shards by another model: files of the same shape to swap in."""
    root = tmp_path_factory.mktemp("other")
    ckpt = make_checkpoint(root / "other.pt", seed=1)
    assert main(["embed", "--checkpoint", str(ckpt), "--data", str(index.parent / "shards"), "--out", str(root / "emb"),
                 "--no-progress"]) == 0
    assert main(["index", "--embeddings", str(root / "emb"), "--out", str(root / "index")]) == 0
    return root / "index"


@pytest.fixture
def copy(index, tmp_path):
    return IndexFolder(shutil.copytree(index, tmp_path / "idx"))


def edit_info(folder: IndexFolder, change) -> None:
    info = json.loads(folder.info.read_text())
    change(info)
    folder.info.write_text(json.dumps(info))


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error" in err, err
    return err


def text_search(folder, *extra):
    return ["search", "--index", str(folder), "--text", "a red square", *extra]


def image_search(folder, image, *extra):
    return ["search", "--index", str(folder), "--image", str(image), *extra]


@pytest.fixture(scope="module")
def query_image(index, tmp_path_factory):
    from retrieval.sources import read_image_bytes

    path = tmp_path_factory.mktemp("q") / "q.jpg"
    path.write_bytes(read_image_bytes(load_index(index).rows([3])[0]))
    return path


def test_k_past_the_bound_is_refused_at_once(index, capsys):
    err = one_line_error(capsys, text_search(index, "-k", "1000000000"))
    assert f"between 1 and {MAX_K}" in err


def test_k_past_the_index_size_gives_every_vector(index, capsys):
    assert main(text_search(index, "-k", str(MAX_K), "--json")) == 0
    assert len(json.loads(capsys.readouterr().out)["results"]) == 48


def test_faiss_is_never_asked_for_more_hits_than_the_index_holds(index):
    loaded = load_index(index)
    asked = []

    class Recording:
        def __init__(self, inner):
            self.inner, self.ntotal = inner, inner.ntotal

        def search(self, queries, k):
            asked.append(k)
            return self.inner.search(queries, k)

    loaded.indexes["image"] = Recording(loaded.indexes["image"])
    hits = loaded.search(np.ones((2, loaded.dim), np.float32) / np.sqrt(loaded.dim), 10**9)
    assert asked == [48] and [len(h) for h in hits] == [48, 48]


@pytest.mark.parametrize("text", ["", "   ", "\t\n"])
def test_an_empty_text_query_is_refused(index, capsys, text):
    assert "non-empty" in one_line_error(capsys, ["search", "--index", str(index), "--text", text])


def test_a_query_line_over_the_limit_is_refused(index, tmp_path, capsys):
    (tmp_path / "q.txt").write_text("a red square\n" + "x" * 5000 + "\n")
    assert "line 2" in one_line_error(capsys, ["search", "--index", str(index), "--queries", str(tmp_path / "q.txt")])


@pytest.mark.parametrize("field, value", [
    ("checkpoint", "/tmp/elsewhere/model.pt"), ("checkpoint", "../model.pt"),
    ("text_query", {"file": "../../other/text_query.ts", "tokenizer": "SimpleTokenizer", "context_length": 77}),
])
def test_info_cannot_name_a_file_outside_the_folder(copy, capsys, field, value):
    edit_info(copy, lambda info: info.__setitem__(field, value))
    err = one_line_error(capsys, text_search(copy.root))
    assert copy.info.name in err and "own" in err


def test_info_cannot_name_a_target_outside_the_folder(copy, capsys):
    edit_info(copy, lambda info: info.__setitem__("targets", ["../../image"]))
    assert "not a file of the folder" in one_line_error(capsys, text_search(copy.root))


def test_an_edited_weights_hash_blocks_text_and_image_search(copy, query_image, capsys):
    edit_info(copy, lambda info: info["model_identity"].__setitem__("weights_sha256", "0" * 16))
    assert "built with model" in one_line_error(capsys, text_search(copy.root))
    assert "built with model" in one_line_error(capsys, image_search(copy.root, query_image))


def test_a_swapped_text_tower_is_detected(copy, other, capsys):
    shutil.copyfile(IndexFolder(other).text_query, copy.text_query)
    err = one_line_error(capsys, text_search(copy.root))
    assert copy.text_query.name in err and "not the file" in err


def test_a_text_tower_of_another_model_is_refused(copy, other, capsys):
    # the tower and its record both from the other index: a consistent file, of the wrong model
    theirs = json.loads(IndexFolder(other).info.read_text())
    shutil.copyfile(IndexFolder(other).text_query, copy.text_query)
    name = copy.text_query.name
    edit_info(copy, lambda info: (info.__setitem__("text_query", theirs["text_query"]),
                                  info["files"].__setitem__(name, theirs["files"][name])))
    assert "built with model" in one_line_error(capsys, text_search(copy.root))


@pytest.mark.parametrize("target", ["image", "caption"])
def test_a_swapped_faiss_file_is_detected_on_load(copy, other, target):
    shutil.copyfile(IndexFolder(other).faiss(target), copy.faiss(target))  # same count and dimension
    with pytest.raises(ValueError, match=f"{target}.faiss is not the file"):
        load_index(copy.root)


def test_swapped_metadata_is_detected_on_load(copy, tmp_path):
    from retrieval.index import _save_metadata

    rows = load_index(copy.root).metadata
    _save_metadata(copy.metadata, [r | {"source": "/etc/passwd"} for r in rows])  # same rows, other paths
    with pytest.raises(ValueError, match="metadata.arrow is not the file"):
        load_index(copy.root)


def full_model_path(folder: IndexFolder) -> IndexFolder:
    """``folder`` without its ONNX image tower: image queries build the model from its copy."""
    folder.image_query.unlink()
    edit_info(folder, lambda info: (info.pop("image_query"), info["files"].pop(folder.image_query.name)))
    return folder


def test_a_swapped_image_tower_is_detected(copy, other, query_image, capsys):
    shutil.copyfile(IndexFolder(other).image_query, copy.image_query)
    err = one_line_error(capsys, image_search(copy.root, query_image))
    assert copy.image_query.name in err and "not the file" in err


def test_an_image_tower_of_another_model_is_refused(copy, other, query_image, capsys):
    theirs = json.loads(IndexFolder(other).info.read_text())
    shutil.copyfile(IndexFolder(other).image_query, copy.image_query)
    name = copy.image_query.name
    edit_info(copy, lambda info: (info.__setitem__("image_query", theirs["image_query"]),
                                  info["files"].__setitem__(name, theirs["files"][name])))
    assert "built with model" in one_line_error(capsys, image_search(copy.root, query_image))


@pytest.mark.parametrize("preprocess", [None, {"resize": 0}, {"crop": [10 ** 9, 10 ** 9]}, {"std": [0, 1, 1]},
                                        {"mean": ["0", 0, 0]}, {"interpolation": "exec"}, {"resize": [1, 2, 3]}])
def test_a_malformed_image_preprocess_falls_back_to_the_full_model(copy, query_image, preprocess, capsys):
    from retrieval.engine import open_engine

    good = json.loads(copy.info.read_text())["image_query"]["preprocess"]
    edit_info(copy, lambda info: info["image_query"].__setitem__(
        "preprocess", None if preprocess is None else {**good, **preprocess}))
    with pytest.raises(ValueError):
        from retrieval.image_query import Preprocess

        Preprocess.from_json(json.loads(copy.info.read_text())["image_query"]["preprocess"])
    engine = open_engine(copy.root)
    assert engine._image_query() is None  # refused: the hits come from the full model instead
    assert main(image_search(copy.root, query_image, "--json")) == 0


def test_a_swapped_model_copy_is_detected(copy, other, query_image, capsys):
    shutil.copyfile(IndexFolder(other).model, full_model_path(copy).model)
    assert copy.model.name in one_line_error(capsys, image_search(copy.root, query_image))


def test_a_model_copy_is_judged_by_its_weights_not_by_what_it_says(copy, other, query_image, capsys):
    import torch

    from clipalign.checkpoint import save_checkpoint

    theirs = torch.load(IndexFolder(other).model, weights_only=True)
    ours = torch.load(copy.model, weights_only=True)
    save_checkpoint(full_model_path(copy).model, {**theirs, "model_identity": ours["model_identity"]})  # another model, claiming ours
    edit_info(copy, lambda info: info["files"].pop(copy.model.name))
    assert "built with model" in one_line_error(capsys, image_search(copy.root, query_image))


def test_an_explicit_checkpoint_is_the_way_to_query_with_outside_weights(copy, index, capsys):
    outside = shutil.copyfile(copy.model, copy.root.parent / "elsewhere.pt")
    copy.model.unlink()
    assert main(text_search(copy.root, "--checkpoint", str(outside), "--json")) == 0
    got = json.loads(capsys.readouterr().out)["results"]
    assert main(text_search(index, "--json")) == 0
    assert [h["id"] for h in got] == [h["id"] for h in json.loads(capsys.readouterr().out)["results"]]


def test_an_older_folder_without_records_loads_and_its_text_queries_are_checked(copy, index):
    edit_info(copy, lambda info: (info.pop("files"), info["text_query"].pop("model_identity")))
    engine = open_engine(copy.root)
    assert engine._text_query is None  # no record binds the tower to the model: the full model answers
    want = open_engine(index).search_texts(["a red square"], 5)[0]
    assert [h["id"] for h in engine.search_texts(["a red square"], 5)[0]] == [h["id"] for h in want]
    edit_info(copy, lambda info: info["model_identity"].__setitem__("weights_sha256", "0" * 16))
    with pytest.raises(ValueError, match="built with model"):
        open_engine(copy.root)


def test_a_large_file_is_hashed_by_its_size_and_ends(tmp_path):
    path = tmp_path / "big.faiss"
    with path.open("wb") as f:  # sparse: 300 MiB on no disk
        f.truncate(300 << 20)
    record = file_digest(path)
    assert record["hashed"] == ENDS and record["size"] == 300 << 20
    with path.open("r+b") as f:
        f.seek(150 << 20)
        f.write(b"x")  # the middle is not hashed: the size and ends are
    check_digest(path, record, "info.json")
    with path.open("r+b") as f:
        f.seek((300 << 20) - 1)
        f.write(b"x")
    with pytest.raises(ValueError, match="not the file"):
        check_digest(path, record, "info.json")
    small = tmp_path / "small"
    small.write_bytes(b"abc")
    assert file_digest(small)["hashed"] == WHOLE


def test_a_fifo_or_a_folder_as_query_image_is_refused_in_one_line(index, tmp_path, capsys):
    with fifo(tmp_path / "q.png") as path:
        assert "not a regular file" in one_line_error(capsys, image_search(index, path))
    assert "not a regular file" in one_line_error(capsys, image_search(index, tmp_path))


def test_classify_counts_a_fifo_as_not_a_file(index, query_image, tmp_path, capsys):
    ckpt = str(IndexFolder(index).model)
    with fifo(tmp_path / "f.png") as path:
        err = one_line_error(capsys, ["classify", str(path), "--checkpoint", ckpt, "--classes", "red,blue"])
        assert "not_a_file" in err
        assert main(["classify", str(path), str(query_image), "--checkpoint", ckpt, "--classes", "red,blue",
                     "--json"]) == 0
        captured = capsys.readouterr()
        out = json.loads(captured.out)
        assert [r["path"] for r in out["results"]] == [str(query_image)] and out["skipped"] == {"not_a_file": 1}
        assert "skipped 1" in captured.err


def test_a_fifo_or_a_folder_as_queries_file_is_refused_in_one_line(index, tmp_path, capsys):
    queries = ["search", "--index", str(index), "--queries"]
    with fifo(tmp_path / "q.txt") as path:  # read, it would hang until the helper's writer gives up
        assert f"queries file {path} is not a regular file" in one_line_error(capsys, [*queries, str(path)])
    assert "not a regular file" in one_line_error(capsys, [*queries, str(tmp_path)])
    assert "not a regular file" in one_line_error(capsys, [*queries, "/dev/null"])
