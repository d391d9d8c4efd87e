"""Shared test helpers."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator

import pytest

# Nothing may download at test time: a hub lookup fails at once instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The tests' Ray clusters listen on 127.0.0.1 only; Ray's token authentication would tie them to a
# token file in ~/.ray that every Ray on the machine shares (and may regenerate).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# `make test` runs the suite in pytest-xdist workers, one a core: one thread each (and in the
# processes they start), so that the workers' OpenMP pools do not fight over the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


# The test files that share one Ray cluster (``ray_cluster``): one xdist worker runs them all.
RAY_TESTS = {"test_cluster.py", "test_prep_ray.py", "test_ray_retrieval.py"}
# The files that take longest, longest first (seconds on one thread of the AVX2 EPYC, 2026-12-02:
# the Ray three 124, distributed 105, registry 103, train 74, caption 68, hostile 65, resume_exact
# 53): the workers start on them, so that neither is left with one at the end. Order only.
LONGEST_FIRST = [*sorted(RAY_TESTS), "test_distributed.py", "test_registry.py", "test_train.py", "test_caption.py",
                 "test_hostile.py", "test_resume_exact.py"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """In xdist workers, the ``LONGEST_FIRST`` files come first (each file's tests keep their order)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """``make test``'s workers take whole files, as ``--dist loadfile`` does, so that a file's module
    fixtures (a trained run, a torchrun launch) are built once, and the Ray files together, in
    the order collected (``LONGEST_FIRST``). (``--dist loadgroup`` would say it with marks, but
    xdist 3.8 loses them under pytest 9.)"""
    from xdist.scheduler import LoadFileScheduling

    class FilesAndRay(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return "ray" if Path(scope).name in RAY_TESTS else scope

    config.option.loadscopereorder = False  # not by the number of tests: a file of 4 can take 100 s
    return FilesAndRay(config, log)


def _read_shards(paths: list[Path] | list[str], decode: bool = True) -> list[dict]:
    """Read tar shards back with webdataset, single-process and in order."""
    import webdataset as wds

    ds = wds.WebDataset([str(p) for p in paths], shardshuffle=False, nodesplitter=lambda src: src)
    if decode:
        ds = ds.decode("pil")
    return list(ds)


@pytest.fixture
def read_shards() -> Callable[..., list[dict]]:
    """``read_shards(paths, decode=True) -> [sample dict, ...]``."""
    return _read_shards


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """The address (``127.0.0.1:PORT``) of a local two-node Ray cluster shared by the session's tests."""
    from tests.ray_cluster import local_cluster

    with local_cluster(Path("/tmp") / f"ray-{os.getpid()}") as address:  # short: Ray's socket paths are bounded
        yield address
