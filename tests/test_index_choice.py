"""The ``auto`` index choice per size and memory budget, and memory-size parsing."""
import pytest

from retrieval.choose import choose_index, ivf_lists, parse_memory

G, M = 1 << 30, 1 << 20


@pytest.mark.parametrize("n, budget, kind", [
    (10_000, 1 * G, "flat"),          # small: exact search
    (100_000, 1 * G, "hnsw"),         # raw vectors + graph fit
    (100_000, 210 * M, "ivf"),        # flat vectors fit, the graph does not
    (1_000_000, 1 * G, "ivfsq8"),     # 2 GB of float32 do not fit, 8-bit codes do
    (1_000_000, 4 * G, "hnsw"),
    (10_000_000, 1 * G, "ivfpq"),     # only compressed codes fit
    (10_000, 8 * M, "ivfsq8"),        # even a small set goes compressed when memory is short
])
def test_auto_choice_by_size_and_budget(n, budget, kind):
    spec = choose_index(n, 512, budget)
    assert spec.kind == kind and spec.memory <= budget


def test_pq_code_is_the_largest_that_fits():
    big = choose_index(10_000_000, 512, 2 * G)
    small = choose_index(10_000_000, 512, 500 * M)
    assert big.kind == small.kind == "ivfpq"
    assert big.factory.startswith("OPQ128_512,") and small.factory.startswith("OPQ32_128,")
    assert choose_index(10_000, 32, 1 * M, "ivfpq").factory.startswith("OPQ8_32,")
    assert small.memory <= 500 * M


def test_impossible_budget_and_oversized_explicit_kind_are_refused():
    with pytest.raises(ValueError, match="do not fit"):
        choose_index(100_000_000, 512, 100 * M)
    with pytest.raises(ValueError, match="raise --max-memory"):
        choose_index(1_000_000, 512, 1 * G, kind="flat")
    assert choose_index(1_000_000, 512, 3 * G, kind="flat").factory == "Flat"


def test_ivf_lists_grow_with_n_and_keep_enough_training_points():
    assert ivf_lists(1_000_000) == 4096 and ivf_lists(10_000) == 256
    assert ivf_lists(500) * 39 <= 500


@pytest.mark.parametrize("text, value", [("4G", 4 * G), ("512M", 512 * M), ("1.5GB", int(1.5 * G)), ("1000", 1000)])
def test_parse_memory(text, value):
    assert parse_memory(text) == value


def test_parse_memory_rejects_nonsense():
    with pytest.raises(ValueError):
        parse_memory("lots")
