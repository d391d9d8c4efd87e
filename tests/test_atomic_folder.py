"""Index folders written whole: swapped into place, never half-written, never mixed by a reader,
never written over a folder of something else; a killed writer leaves the previous index."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from clipalign.formats.folders import IndexFolder
from retrieval import atomic_folder
from retrieval.atomic_folder import pinned_folder, replaced_folder
from retrieval.index import add_to_index, load_index, save_index
from tests.retrieval_toy import clustered

ROOT = Path(__file__).resolve().parents[1]
VECTORS = clustered(300, 16, seed=0)


def _meta(n, start=0):
    return [{"key": f"{i:06d}", "caption": f"c{i}", "source": f"s/{i}"} for i in range(start, start + n)]


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name not in (folder.name, "m"))


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_a_write_replaces_the_folder_whole(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic_folder, "_exchange", lambda a, b: False)
    out = tmp_path / "idx"
    save_index(out, {"image": VECTORS[:100]}, _meta(100), {"model": "toy"}, kind="flat")
    (out / "stale.txt").write_text("a file of the old version")
    save_index(out, {"image": VECTORS}, _meta(300), {"model": "toy"}, kind="flat")
    assert load_index(out).info["count"] == 300 and not (out / "stale.txt").exists()
    assert _siblings(out) == []  # no temporary or set-aside folder left


def test_a_failed_write_leaves_the_previous_folder_untouched(tmp_path, monkeypatch):
    out = tmp_path / "idx"
    save_index(out, {"image": VECTORS[:100]}, _meta(100), {"model": "toy"}, kind="flat")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def die(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("retrieval.index._save_metadata", die)
    with pytest.raises(KeyboardInterrupt):
        save_index(out, {"image": VECTORS}, _meta(300), {"model": "toy"}, kind="flat")
    with pytest.raises(KeyboardInterrupt):
        add_to_index(out, {"image": VECTORS[100:]}, _meta(200, 100))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and _siblings(out) == []


def test_a_reader_pinned_to_a_folder_never_sees_the_next_version(tmp_path):
    out = tmp_path / "f"
    with replaced_folder(out, "info.json") as tmp:
        (tmp / "info.json").write_text("1")
        (tmp / "data").write_text("1")
    with pinned_folder(out) as pinned:
        first = (pinned / "info.json").read_text()
        with replaced_folder(out, "info.json") as tmp:  # swapped in between the reader's two reads
            (tmp / "info.json").write_text("2")
            (tmp / "data").write_text("2")
        assert first == "1" and not (pinned / "data").exists()  # gone with the old version, never the new one
        assert atomic_folder.swapped(pinned, out)
    assert (out / "data").read_text() == "2"


def test_a_load_that_meets_a_swap_reads_the_new_version_whole(tmp_path, monkeypatch):
    import retrieval.index as ix

    out = tmp_path / "idx"
    save_index(out, {"image": VECTORS[:100]}, _meta(100), {"model": "toy"}, kind="flat")
    real, calls = ix._read_metadata, []

    def swap_first(folder):
        calls.append(folder)
        if len(calls) == 1:  # a writer swaps a new version in while this reader is halfway
            monkeypatch.setattr(ix, "_read_metadata", real)
            save_index(out, {"image": VECTORS}, _meta(300), {"model": "toy"}, kind="flat")
            monkeypatch.setattr(ix, "_read_metadata", swap_first)
        return real(folder)

    monkeypatch.setattr(ix, "_read_metadata", swap_first)
    index = load_index(out)
    assert len(calls) == 2 and index.info["count"] == index.table.num_rows == index.indexes["image"].ntotal == 300


def test_a_folder_of_something_else_is_never_replaced(tmp_path):
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(ValueError, match="without info.json"):
        save_index(mine, {"image": VECTORS[:10]}, _meta(10), {"model": "toy"}, kind="flat")
    assert [p.name for p in mine.iterdir()] == ["holiday.jpg"] and _siblings(mine) == []


# Writes the index of argv[1] from the vectors and rows in the folder argv[2] (importing retrieval
# alone, not the tests' model helpers), and hangs once its metadata is written.
KILLED_WRITER = """
import json, sys, time
from pathlib import Path
import numpy as np
import retrieval.index as ix
out, given, how = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
vectors, rows = np.load(given / "vectors.npy"), json.loads((given / "rows.json").read_text())
real = ix._save_metadata
def slow(path, rows):
    real(path, rows)
    (given / "marker").write_text("written")
    time.sleep(120)
ix._save_metadata = slow
if how == "add":
    ix.add_to_index(out, {"image": vectors}, rows)
else:
    ix.save_index(out, {"image": vectors}, rows, {"model": "toy"}, kind="flat")
"""


@pytest.mark.parametrize("how", ["build", "add"])
def test_a_writer_killed_mid_write_leaves_the_previous_index(tmp_path, how):
    out = tmp_path / "idx"
    save_index(out, {"image": VECTORS[:100]}, _meta(100), {"model": "toy"}, kind="flat")
    given = tmp_path / "m"
    given.mkdir()
    np.save(given / "vectors.npy", VECTORS[100:] if how == "add" else VECTORS)
    (given / "rows.json").write_text(json.dumps(_meta(200, 100) if how == "add" else _meta(300)))
    marker = given / "marker"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(out), str(given), how], cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the writer never reached its metadata"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    index = load_index(out)
    assert index.info["count"] == 100 and index.indexes["image"].ntotal == 100
    left = _siblings(out)
    assert left and all(name.startswith(f".{out.name}.tmp-{proc.pid}-") for name in left)  # the half write, hidden
    index, skipped = add_to_index(out, {"image": VECTORS[100:]}, _meta(200, 100))  # the next write clears it
    assert (index.info["count"], skipped) == (300, 0) and _siblings(out) == []


def test_a_write_killed_between_two_renames_is_undone_by_the_next(tmp_path):
    out = tmp_path / "idx"
    save_index(out, {"image": VECTORS[:100]}, _meta(100), {"model": "toy"}, kind="flat")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    aside = tmp_path / f".idx.old-{dead.stdout.strip()}-x"
    os.rename(out, aside)  # as the fallback swap leaves it when killed after its first rename
    index, skipped = add_to_index(out, {"image": VECTORS[:150]}, _meta(150))
    assert (index.info["count"], skipped) == (150, 100) and _siblings(out) == []


def test_adding_the_same_rows_twice_adds_them_once(tmp_path):
    out = tmp_path / "idx"
    save_index(out, {"image": VECTORS[:100]}, _meta(100), {"model": "toy"}, kind="flat")
    first, skipped = add_to_index(out, {"image": VECTORS[50:200]}, _meta(150, 50))
    assert (first.info["count"], skipped) == (200, 50)
    info = IndexFolder(out).info.read_text()
    again, skipped = add_to_index(out, {"image": VECTORS[50:200]}, _meta(150, 50))
    assert (again.info["count"], skipped) == (200, 150) and IndexFolder(out).info.read_text() == info
    hit = again.search(VECTORS[150:151], 1)[0][0]
    assert hit["id"] == 150 and hit["key"] == "000150"
    assert json.loads(info)["files"]["image.faiss"]["size"] == IndexFolder(out).faiss("image").stat().st_size
    assert np.array_equal(again.table.column("key").to_numpy(zero_copy_only=False), [f"{i:06d}" for i in range(200)])


def test_rows_of_another_collection_with_the_same_keys_are_added(tmp_path):
    out = tmp_path / "idx"
    rows = [{"key": f"{i:09d}", "shard": "/data/a/00000.tar", "source": ""} for i in range(10)]
    save_index(out, {"image": VECTORS[:10]}, rows, {"model": "toy"}, kind="flat")
    theirs = [r | {"shard": "/data/b/00000.tar"} for r in rows]  # prep numbers every collection from 0
    index, skipped = add_to_index(out, {"image": VECTORS[10:20]}, theirs)
    assert (index.info["count"], skipped) == (20, 0)
