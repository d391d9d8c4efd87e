"""The query engine's own parts: the text batcher against one-at-a-time encoding, and its bounds."""
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from retrieval.engine import MAX_K, MAX_TEXT, Batcher, check_k, check_texts


def encode(texts):
    """A plain reference: one row per text, from the text alone."""
    return np.array([[len(t), sum(map(ord, t))] for t in texts], np.float32)


def test_concurrent_callers_are_encoded_together_and_each_gets_its_own_rows():
    calls, gate = [], threading.Event()

    def slow(texts):
        calls.append(len(texts))
        gate.wait(5)  # the first call holds the encoder while the others queue
        return encode(texts)

    batcher = Batcher(slow, max_batch=64)
    queries = [[f"query {i}"] * (1 + i % 3) for i in range(30)]
    with ThreadPoolExecutor(30) as pool:
        futures = [pool.submit(batcher, q) for q in queries]
        time.sleep(0.3)
        gate.set()
        results = [f.result(timeout=30) for f in futures]
    for q, got in zip(queries, results):
        assert np.array_equal(got, encode(q))
    assert sum(calls) == sum(map(len, queries)) and len(calls) < len(queries) and max(calls) <= 64


def test_a_lone_caller_waits_for_nothing_and_max_batch_one_encodes_each_alone():
    calls = []
    batcher = Batcher(lambda texts: calls.append(len(texts)) or encode(texts), max_batch=1)
    assert np.array_equal(batcher(["a", "bb"]), encode(["a", "bb"]))  # one caller's texts are never split
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(batcher, [["x"]] * 16))
    assert calls == [2] + [1] * 16


def test_one_callers_failure_is_its_own():
    gate = threading.Event()

    def fragile(texts):
        gate.wait(5)
        if "bad" in texts:
            raise ValueError("cannot encode 'bad'")
        return encode(texts)

    batcher = Batcher(fragile)
    with ThreadPoolExecutor(10) as pool:
        futures = [pool.submit(batcher, ["bad" if i == 4 else f"ok {i}"]) for i in range(10)]
        time.sleep(0.3)
        gate.set()
        for i, f in enumerate(futures):
            if i == 4:
                with pytest.raises(ValueError, match="bad"):
                    f.result(timeout=30)
            else:
                assert np.array_equal(f.result(timeout=30), encode([f"ok {i}"]))


def test_the_bounds():
    assert check_k(1) == 1 and check_k(MAX_K) == MAX_K
    for k in (0, -1, MAX_K + 1, 10**9):
        with pytest.raises(ValueError, match=f"between 1 and {MAX_K}"):
            check_k(k)
    assert check_texts([" a red square "]) == ["a red square"]
    for texts in ([], [""], ["ok", "  "], ["x" * (MAX_TEXT + 1)]):
        with pytest.raises(ValueError):
            check_texts(texts)
