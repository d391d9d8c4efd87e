"""Streaming: peak memory while reading and sharding a 400k-row manifest stays that of a 10k-row one."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh process so ru_maxrss is this job's peak alone.
SCRIPT = """
import resource, sys
from data_prep.manifest import open_records
from data_prep.prep import plan_shards
rows = 0
for _, shard in plan_shards(open_records(sys.argv[1], extra_cols=None), 1000):
    rows += len(shard)
print(rows, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _manifest(path: Path, n: int) -> Path:
    lines = (f"img/{i % 7}.jpg,a caption for row {i} with a few words,{i}\n" for i in range(n))
    with open(path, "w") as f:
        f.write("image,caption,row\n")
        f.writelines(lines)
    return path


def _peak_kib(path: Path) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(path)], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    rows, peak = out.stdout.split()
    return int(rows), int(peak)


def test_a_big_manifest_streams_in_flat_memory(tmp_path):
    small_rows, small_peak = _peak_kib(_manifest(tmp_path / "small.csv", 10_000))
    big_rows, big_peak = _peak_kib(_manifest(tmp_path / "big.csv", 400_000))
    assert (small_rows, big_rows) == (10_000, 400_000)
    # Holding the rows would take over 100 MB; streaming keeps the peak within a few MB.
    assert big_peak - small_peak < 20 * 1024, (small_peak, big_peak)
