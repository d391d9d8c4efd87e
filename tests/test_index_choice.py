"""The ``auto`` index choice per size and memory budget, and memory-size parsing."""
import pytest

from retrieval.choose import choose_index, fastscan_lists, fastscan_subquantizers, ivf_lists, parse_memory, spec_for

G, M = 1 << 30, 1 << 20


@pytest.mark.parametrize("n, budget, kind, refine", [
    (10_000, 1 * G, "flat", ""),                 # small: exact search
    (100_000, 1 * G, "ivfpqfs", "RFlat"),        # raw vectors fit: fast scan re-ranked exactly
    (100_000, 100 * M, "ivfpqfs", "Refine(SQ8)"),  # they do not: re-ranked with 8-bit codes
    (1_000_000, 1 * G, "ivfpqfs", "Refine(SQ8)"),  # issue #6: 1M × 512-d in 1 GB
    (1_000_000, 4 * G, "ivfpqfs", "RFlat"),
    (1_000_000, 530 * M, "ivfsq8", ""),          # the 8-bit codes alone fit, not with the 4-bit ones beside them
    (10_000_000, 1 * G, "ivfpq", ""),            # only compressed codes fit
    (10_000, 8 * M, "ivfpqfs", "Refine(SQ8)"),   # even a small set goes compressed when memory is short
])
def test_auto_choice_by_size_and_budget(n, budget, kind, refine):
    spec = choose_index(n, 512, budget)
    assert spec.kind == kind and spec.memory <= budget
    assert spec.factory.endswith("," + refine) == bool(refine) == spec.refine


def test_hnsw_and_ivf_flat_are_built_only_by_name():
    for n, budget in ((100_000, 4 * G), (1_000_000, 8 * G)):
        assert choose_index(n, 512, budget).kind == "ivfpqfs"
        assert choose_index(n, 512, budget, "hnsw").factory == "HNSW32,Flat"
        assert choose_index(n, 512, budget, "ivf").factory == f"IVF{ivf_lists(n)},Flat"


def test_pq_code_is_the_largest_that_fits():
    big = choose_index(10_000_000, 512, 2 * G)
    small = choose_index(10_000_000, 512, 500 * M)
    assert big.kind == small.kind == "ivfpq"
    assert big.factory.startswith("OPQ128_512,") and small.factory.startswith("OPQ32_128,")
    assert choose_index(10_000, 32, 1 * M, "ivfpq").factory.startswith("OPQ8_32,")
    assert small.memory <= 500 * M


def test_fastscan_spec_at_one_million():
    spec = choose_index(1_000_000, 512, 1 * G)
    assert spec.factory == "IVF1024,PQ128x4fs,Refine(SQ8)" and spec.refine and spec.param == "nprobe"
    assert spec.nlist == 1024 == fastscan_lists(1_000_000)
    # 64 B of 4-bit codes + 512 B of 8-bit codes + an 8 B id a vector, and the centroids
    assert 1_000_000 * 584 < spec.memory < 1_000_000 * 584 + 8 * M
    exact = choose_index(1_000_000, 512, 4 * G)
    assert exact.factory == "IVF1024,PQ128x4fs,RFlat" and exact.memory - spec.memory == 1_000_000 * 3 * 512 - 8 * 512


@pytest.mark.parametrize("dim, m", [(512, 128), (32, 8), (30, 15), (31, 31)])
def test_fastscan_subquantizers_divide_the_dimension(dim, m):
    assert fastscan_subquantizers(dim) == m and dim % m == 0
    assert spec_for("ivfpqfs", 10_000, dim).factory == f"IVF{fastscan_lists(10_000)},PQ{m}x4fs,RFlat"


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
