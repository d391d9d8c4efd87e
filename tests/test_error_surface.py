"""Writes that fail (a full disk, a read-only folder) name the file they were writing and leave
no temporary file: the atomic writer, the safetensors export, and a shard's tar and table.

A full disk is a file-size limit (``RLIMIT_FSIZE``, SIGXFSZ ignored) in a child process: a
write past it fails with EFBIG, as it would with ENOSPC.
"""
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from clipalign.export import save_safetensors
from clipalign.formats.atomic import replace_file, temporary_path, write_json

ROOT = Path(__file__).resolve().parents[1]

# Runs `phase` (below) in a child: build the shard unlimited or not, then commit it under
# RLIMIT_FSIZE; prints what the OSError said and which files are left.
SHARD = r"""
import json, resource, signal, sys
from pathlib import Path
from data_prep.manifest import read_folder
from data_prep.sample import SampleConfig
from data_prep.shard_job import build_shard, commit_shard

images, out, phase, limit = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
out.mkdir()

def full_disk():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

records = list(read_folder(images))
error = None
try:
    if phase == "build":
        full_disk()
    result = build_shard(0, records, str(out), SampleConfig(image_size=16), threads=1)
    full_disk()
    commit_shard(out, result, seen=set())
except OSError as err:
    error = {"errno": err.errno, "filename": err.filename, "filename2": err.filename2}
print(json.dumps({"error": error, "left": sorted(p.name for p in out.iterdir())}))
"""


def test_a_failed_write_names_the_target_and_leaves_the_old_file(tmp_path):
    target = tmp_path / "info.json"
    write_json(target, {"version": 1})

    def fill_the_disk(tmp: Path) -> None:
        tmp.write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")  # as a library reports it: no file named

    with pytest.raises(OSError) as err:
        replace_file(target, fill_the_disk)
    assert (err.value.errno, err.value.filename) == (errno.ENOSPC, str(target))
    assert err.value.strerror == os.strerror(errno.ENOSPC)
    assert json.loads(target.read_text()) == {"version": 1}  # the previous version, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["info.json"]  # no temporary file


def test_an_error_about_another_file_keeps_its_name(tmp_path):
    def read_a_missing_source(tmp: Path) -> None:
        tmp.write_bytes(b"")
        open(tmp_path / "missing.bin", "rb")

    with pytest.raises(FileNotFoundError) as err:
        replace_file(tmp_path / "out.bin", read_a_missing_source)
    assert err.value.filename == str(tmp_path / "missing.bin")
    assert list(tmp_path.iterdir()) == []


def test_a_copy_that_fills_the_disk_names_the_target_not_the_temporary_file(tmp_path):
    def copy(tmp: Path) -> None:
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG), str(tmp_path / "src"), None, str(tmp))

    with pytest.raises(OSError) as err:
        replace_file(tmp_path / "model.pt", copy)
    assert (err.value.filename, err.value.filename2) == (str(tmp_path / "model.pt"), None)

    def unreadable(tmp: Path) -> None:  # not an error of writing: both files stay named
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(tmp_path / "src"), None, str(tmp))

    with pytest.raises(OSError) as err:
        replace_file(tmp_path / "model.pt", unreadable)
    assert (err.value.filename, err.value.filename2) == (str(tmp_path / "src"), str(tmp_path / "model.pt"))


def test_a_safetensors_write_that_fails_is_an_os_error_naming_the_file(tmp_path):
    target = tmp_path / "m.safetensors"
    temporary_path(target).mkdir()  # safetensors' own writer fails on it (EISDIR), as it would on a full disk
    with pytest.raises(OSError) as err:
        save_safetensors(target, {"w": torch.zeros(4)})
    assert (err.value.errno, err.value.filename) == (errno.EISDIR, str(target))
    assert not target.exists()


def _shard_job(tmp_path: Path, phase: str, limit: int) -> dict:
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.effect_noise((48, 48), 64 + 10 * i).convert("RGB").save(images / f"{i}.png")  # noise: no two alike
        (images / f"{i}.txt").write_text(f"caption {i}")
    done = subprocess.run([sys.executable, "-c", SHARD, str(images), str(tmp_path / "out"), phase, str(limit)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_shard_tar_that_fills_the_disk_is_named_and_removed(tmp_path):
    got = _shard_job(tmp_path, "build", limit=2048)
    assert got["error"] == {"errno": errno.EFBIG, "filename": str(tmp_path / "out" / "00000.tar"), "filename2": None}
    assert got["left"] == []  # the temporary tar is gone


def test_a_shard_commit_that_fills_the_disk_is_named_and_cleans_up(tmp_path):
    got = _shard_job(tmp_path, "commit", limit=1024)  # the tar is built; its parquet table does not fit
    assert got["error"] == {"errno": errno.EFBIG, "filename": str(tmp_path / "out" / "00000.parquet"),
                            "filename2": None}
    assert got["left"] == []  # neither the table's temporary file nor the shard's tar
