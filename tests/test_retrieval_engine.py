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


def _queued(batcher: Batcher) -> int:
    """How many callers wait in the batcher's queue (read under its lock)."""
    with batcher._cv:
        return len(batcher._pending)


def _wait_until(check, what: str, timeout_s: float = 30) -> None:
    """Poll ``check`` until it holds; the timeout only guards against a hang, and fails loudly."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


def _held(encoder, inside: threading.Event, gate: threading.Event, calls: list[int]):
    """``encoder`` that records each call's size, says it is inside, and waits for ``gate``."""
    def held(texts):
        calls.append(len(texts))
        inside.set()
        assert gate.wait(30), "the test never opened the gate"
        return encoder(texts)
    return held


def test_concurrent_callers_are_encoded_together_and_each_gets_its_own_rows():
    calls, inside, gate = [], threading.Event(), threading.Event()
    batcher = Batcher(_held(encode, inside, gate, calls), max_batch=64)
    queries = [[f"query {i}"] * (1 + i % 3) for i in range(30)]
    with ThreadPoolExecutor(30) as pool:
        futures = [pool.submit(batcher, queries[0])]
        assert inside.wait(30)  # the first caller holds the encoder...
        futures += [pool.submit(batcher, q) for q in queries[1:]]
        _wait_until(lambda: _queued(batcher) == len(queries) - 1, "the other callers queue")  # ...the rest wait
        gate.set()
        results = [f.result(timeout=30) for f in futures]
    for q, got in zip(queries, results):
        assert np.array_equal(got, encode(q))
    assert calls == [1, sum(map(len, queries[1:]))]  # the 29 queued callers' 59 texts in one call (<= 64)


def test_a_lone_caller_waits_for_nothing_and_max_batch_one_encodes_each_alone():
    calls = []
    batcher = Batcher(lambda texts: calls.append(len(texts)) or encode(texts), max_batch=1)
    assert np.array_equal(batcher(["a", "bb"]), encode(["a", "bb"]))  # one caller's texts are never split
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(batcher, [["x"]] * 16))
    assert calls == [2] + [1] * 16


def test_one_callers_failure_is_its_own():
    def fragile(texts):
        if "bad" in texts:
            raise ValueError("cannot encode 'bad'")
        return encode(texts)

    calls, inside, gate = [], threading.Event(), threading.Event()
    batcher = Batcher(_held(fragile, inside, gate, calls))
    with ThreadPoolExecutor(10) as pool:
        futures = [pool.submit(batcher, ["ok 0"])]
        assert inside.wait(30)
        futures += [pool.submit(batcher, ["bad" if i == 4 else f"ok {i}"]) for i in range(1, 10)]
        _wait_until(lambda: _queued(batcher) == 9, "the other callers queue")
        gate.set()
        for i, f in enumerate(futures):
            if i == 4:
                with pytest.raises(ValueError, match="bad"):
                    f.result(timeout=30)
            else:
                assert np.array_equal(f.result(timeout=30), encode([f"ok {i}"]))
    assert calls == [1, 9] + [1] * 9  # the failed batch of 9 is encoded again one caller at a time


def test_the_bounds():
    assert check_k(1) == 1 and check_k(MAX_K) == MAX_K
    for k in (0, -1, MAX_K + 1, 10**9):
        with pytest.raises(ValueError, match=f"between 1 and {MAX_K}"):
            check_k(k)
    assert check_texts([" a red square "]) == ["a red square"]
    for texts in ([], [""], ["ok", "  "], ["x" * (MAX_TEXT + 1)]):
        with pytest.raises(ValueError):
            check_texts(texts)
