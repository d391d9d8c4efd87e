"""The fetch -> encode stages of a shard: record order and outcomes whatever the thread counts."""
import os

import pytest
from PIL import Image

from data_prep.manifest import read_folder
from data_prep.sample import SampleConfig, safe_process_record
from data_prep.shard_job import _outcomes, encode_threads


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
