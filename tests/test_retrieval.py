import numpy as np
import pytest

from retrieval.index import load_index, save_index


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture()
def collection(tmp_path):
    rng = np.random.default_rng(0)
    images = _unit(rng.normal(size=(200, 16)))
    captions = _unit(images + 0.01 * rng.normal(size=images.shape))
    meta = [{"key": f"{i:09d}", "caption": f"caption {i}", "source": f"img/{i}.png"} for i in range(200)]
    index = save_index(tmp_path / "idx", {"image": images, "caption": captions}, meta, {"model": "toy"})
    return tmp_path / "idx", images, captions, index


def test_search_returns_the_exact_nearest_neighbours(collection):
    folder, images, _, _ = collection
    index = load_index(folder)
    rng = np.random.default_rng(1)
    queries = _unit(rng.normal(size=(5, 16)))
    hits = index.search(queries, k=7)
    expected = np.argsort(-(queries @ images.T), axis=1)[:, :7]
    for q, row in enumerate(hits):
        assert [int(h["key"]) for h in row] == expected[q].tolist()
        assert [h["rank"] for h in row] == list(range(1, 8))
        assert row[0]["score"] == pytest.approx(float(queries[q] @ images[expected[q, 0]]), abs=1e-5)


def test_a_vector_finds_itself_and_its_caption(collection):
    folder, images, _, _ = collection
    index = load_index(folder)
    assert index.search(images[42:43], k=1)[0][0]["key"] == f"{42:09d}"
    hit = index.search(images[42:43], k=1, target="caption")[0][0]
    assert hit["caption"] == "caption 42" and hit["score"] > 0.99


def test_info_and_metadata_round_trip(collection):
    folder, _, _, built = collection
    index = load_index(folder)
    assert index.info["dim"] == 16 and index.info["count"] == 200 and index.info["model"] == "toy"
    assert index.metadata == built.metadata


def test_dimension_mismatch_is_refused(collection):
    folder, *_ = collection
    with pytest.raises(ValueError, match="dimension"):
        load_index(folder).search(np.ones((1, 8), np.float32), k=1)


def test_metadata_must_match_vectors(tmp_path):
    with pytest.raises(ValueError):
        save_index(tmp_path, {"image": np.ones((3, 4), np.float32)}, [{"key": "a"}], {})
