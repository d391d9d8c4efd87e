"""Which FAISS index fits a collection: by its size, dimension and a memory budget, as autofaiss does.

The ladder, fastest at a given recall first: exact ``Flat`` for small sets; then
``IVF,PQ·x4fs`` with re-ranking (4-bit fast-scan PQ codes scanned with SIMD, the best
candidates re-ranked with the raw vectors when they fit, else with 8-bit scalar codes);
``IVF,SQ8`` (8-bit codes alone); then ``OPQ+IVF+PQ`` with the largest code that fits.
Measured at 100k and 1M 512-d vectors (docs/retrieval.md), the fast-scan index reached any
recall faster than ``HNSW32`` and ``IVF,Flat`` with less memory and a much shorter build, so
those two are built only when asked for by name. The 8-bit steps are not in autofaiss.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

KINDS = ("flat", "hnsw", "ivf", "ivfpqfs", "ivfsq8", "ivfpq")
FLAT_MAX = 50_000  # above this an exact scan costs more than a millisecond a query
HNSW_M = 32
PQ_CODES = (128, 64, 32, 16, 8)  # bytes per vector, largest first
FASTSCAN_BLOCK = 32  # fast-scan inverted lists hold codes in blocks of 32 vectors
HEADERS = 4096  # bytes of index headers, whatever the size


@dataclass(frozen=True)
class IndexSpec:
    """A FAISS index to build: ``faiss.index_factory(dim, factory, METRIC_INNER_PRODUCT)``."""

    kind: str  # one of KINDS
    factory: str
    memory: int  # estimated bytes in RAM
    param: str | None = None  # the search-time knob to tune: "nprobe", "efSearch" or None
    nlist: int = 0
    refine: bool = False  # re-ranks k·k_factor candidates: "k_factor_rf" is tuned too


def parse_memory(text: str | int) -> int:
    """``"4G"``, ``"512M"``, ``"1.5GB"`` or a byte count → bytes (powers of 1024)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)I?B?\s*", str(text).upper())
    if not m:
        raise ValueError(f"cannot read memory size {text!r} (examples: 4G, 512M, 1.5GB)")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " "))


def ivf_lists(n: int) -> int:
    """Inverted lists for ``n`` vectors: a power of two near 4·√n, with ≥ 39 training points each."""
    nlist = 2 ** round(math.log2(max(4 * math.sqrt(max(n, 1)), 1)))
    return max(1, min(nlist, 65536, n // 39))


def fastscan_lists(n: int) -> int:
    """Inverted lists for a fast-scan index: a quarter of ``ivf_lists(n)`` (about √n).

    Scanning 4-bit codes is cheap, so larger lists cost little query time, while k-means gets
    16 times cheaper (a quarter of the centroids, trained on a quarter of the points).
    """
    return max(1, ivf_lists(n) // 4)


def fastscan_subquantizers(dim: int) -> int:
    """PQ sub-quantizers of a fast-scan code: one per 4 dimensions (fewer dims when 4 does not divide ``dim``)."""
    return dim // math.gcd(dim, 4)


def _estimate(kind: str, n: int, dim: int, nlist: int, code: int = 0) -> int:
    """Bytes of a ``kind`` index of ``n`` vectors, headers and per-list sizes included."""
    return HEADERS + 16 * nlist + _payload(kind, n, dim, nlist, code)


def _payload(kind: str, n: int, dim: int, nlist: int, code: int) -> int:
    ids = 8 * n  # IVF keeps an int64 id per vector
    if kind == "flat":
        return 4 * n * dim
    if kind == "hnsw":
        return 4 * n * dim + int(n * (2 * HNSW_M * 4 * 1.05 + 16))
    if kind == "ivf":
        return 4 * n * dim + ids + 4 * nlist * dim
    if kind == "ivfsq8":
        return n * dim + ids + 4 * nlist * dim + 8 * dim
    d_out = min(dim, 4 * code)
    return n * code + ids + 4 * nlist * d_out + 4 * dim * d_out + 4 * 256 * d_out


def _fastscan_estimate(n: int, dim: int, nlist: int, refine_bytes: int) -> int:
    """Bytes of a fast-scan IVF index whose re-ranking codes take ``refine_bytes`` in all."""
    code = (fastscan_subquantizers(dim) + 1) // 2  # 4-bit codes, padded to whole blocks in each list
    return HEADERS + 16 * nlist + (n + FASTSCAN_BLOCK * nlist) * code + 8 * n + 4 * nlist * dim + 4 * 16 * dim + refine_bytes


def spec_for(kind: str, n: int, dim: int, budget: int | None = None) -> IndexSpec:
    """The spec of ``kind`` for ``n`` vectors; for ``ivfpq`` the largest code that fits ``budget``, for
    ``ivfpqfs`` re-ranking with the raw vectors if they fit ``budget``, else with 8-bit codes."""
    nlist = ivf_lists(n)
    if kind == "flat":
        return IndexSpec("flat", "Flat", _estimate("flat", n, dim, 0))
    if kind == "hnsw":
        return IndexSpec("hnsw", f"HNSW{HNSW_M},Flat", _estimate("hnsw", n, dim, 0), "efSearch")
    if kind == "ivf":
        return IndexSpec("ivf", f"IVF{nlist},Flat", _estimate("ivf", n, dim, nlist), "nprobe", nlist)
    if kind == "ivfpqfs":  # re-ranked with the raw vectors when they fit, else with 8-bit codes
        nlist = fastscan_lists(n)
        fs = f"IVF{nlist},PQ{fastscan_subquantizers(dim)}x4fs"
        memory = _fastscan_estimate(n, dim, nlist, 4 * n * dim)
        if budget is None or memory <= budget:
            return IndexSpec("ivfpqfs", f"{fs},RFlat", memory, "nprobe", nlist, refine=True)
        sq8 = _fastscan_estimate(n, dim, nlist, n * dim + 8 * dim)  # codes + per-dimension ranges
        return IndexSpec("ivfpqfs", f"{fs},Refine(SQ8)", sq8, "nprobe", nlist, refine=True)
    if kind == "ivfsq8":
        return IndexSpec("ivfsq8", f"IVF{nlist},SQ8", _estimate("ivfsq8", n, dim, nlist), "nprobe", nlist)
    if kind == "ivfpq":
        codes = [c for c in PQ_CODES if 4 * c <= dim] or [max(1, dim // 4)]  # sub-vectors of >= 4 dims
        fitting = [c for c in codes if budget is None or _estimate("ivfpq", n, dim, nlist, c) <= budget]
        code = (fitting or codes[-1:])[0]
        d_out = min(dim, 4 * code)
        return IndexSpec("ivfpq", f"OPQ{code}_{d_out},IVF{nlist},PQ{code}x8np",  # np: no polysemous training
                         _estimate("ivfpq", n, dim, nlist, code), "nprobe", nlist)
    raise ValueError(f"unknown index kind {kind!r} (choose from auto, {', '.join(KINDS)})")


def choose_index(n: int, dim: int, budget: int, kind: str = "auto") -> IndexSpec:
    """The index for ``n`` vectors of ``dim`` within ``budget`` bytes.

    Raises:
        ValueError: an explicit ``kind`` (or even the smallest PQ code) does not fit the budget.
    """
    if kind != "auto":
        spec = spec_for(kind, n, dim, budget)
        if spec.memory > budget:
            raise ValueError(f"a {kind} index of {n} vectors needs about {spec.memory / 2**20:.0f} MiB, "
                             f"over the {budget / 2**20:.0f} MiB budget: raise --max-memory or use --index auto")
        return spec
    ladder = (["flat"] if n <= FLAT_MAX else []) + ["ivfpqfs", "ivfsq8", "ivfpq"]
    for k in ladder:
        spec = spec_for(k, n, dim, budget)
        if spec.memory <= budget:
            return spec
    raise ValueError(f"{n} vectors of dimension {dim} do not fit in {budget / 2**20:.0f} MiB even as "
                     f"{spec.factory} (about {spec.memory / 2**20:.0f} MiB): raise --max-memory")
