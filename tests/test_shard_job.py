"""The fetch -> encode stages of a shard: record order and outcomes whatever the thread counts."""
import os
from pathlib import Path

import pytest
from PIL import Image

from data_prep.manifest import read_folder
from data_prep.sample import SampleConfig, safe_process_record
from data_prep.shard_job import _outcomes, build_shard, commit_shard, encode_threads


@pytest.fixture
def records(tmp_path):
    for i in range(12):
        Image.new("RGB", (20 + i, 16), (20 * i, 100, 0)).save(tmp_path / f"{i:02d}.png")
        (tmp_path / f"{i:02d}.txt").write_text(f"caption {i}" if i % 5 else "  ")  # 0, 5, 10: empty
    (tmp_path / "03.png").write_bytes(b"not an image")
    (tmp_path / "07.png").unlink()
    (tmp_path / "07.jpg").write_bytes(b"\xff\xd8\xff truncated")
    return list(read_folder(tmp_path))


@pytest.mark.parametrize("threads, encoders", [(4, 1), (1, 2), (4, 3), (16, 2)])
def test_outcomes_keep_record_order_and_match_one_thread(records, threads, encoders):
    config = SampleConfig(image_size=8)
    expected = [safe_process_record(r, config) for r in records]
    got = list(_outcomes(records, config, threads, encoders))
    assert [o.record.index for o in got] == [r.index for r in records]
    assert [(o.reason, o.sample) for o in got] == [(o.reason, o.sample) for o in expected]
    assert {o.reason for o in got} == {None, "empty_caption", "undecodable_image"}


def test_encode_threads_share_the_cores():
    cores = len(os.sched_getaffinity(0))
    assert encode_threads(1) == cores
    assert encode_threads(2) == max(1, cores // 2)
    assert encode_threads(10_000) == 1  # never none


def test_two_builds_of_one_shard_never_share_a_temporary_file(records, tmp_path):
    """A retried shard may build beside a worker thought dead (on another node, whose pid can be
    this one's): each build writes its own file, and either one commits the same shard."""
    out = tmp_path / "out"
    out.mkdir()
    config = SampleConfig(image_size=8)
    first, second = (build_shard(0, records, out, config, threads=2, encoders=1) for _ in range(2))
    assert first.tmp_tar != second.tmp_tar
    assert Path(first.tmp_tar).read_bytes() == Path(second.tmp_tar).read_bytes()
    commit_shard(out, second, seen=None)
    built = (out / "00000.tar").read_bytes()
    commit_shard(out, first, seen=None)
    assert (out / "00000.tar").read_bytes() == built
    assert sorted(p.name for p in out.iterdir() if ".tmp" in p.name) == []
