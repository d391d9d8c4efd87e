"""Resume and determinism: a SIGKILLed run, re-run, equals a clean run byte for byte."""
from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from PIL import Image

from data_prep.manifest import open_records
from data_prep.prep import PrepConfig, ResumeMismatch, WorkerDied, run_prep
from data_prep.shard_plan import run_job
from data_prep.sample import SampleConfig
from tests.prep_server import LoopbackServer, send

N_ROWS = 120
SHARD = 10
GATE_AT = 55  # rows from here on wait until the test opens the gate
BAD = {7: "missing", 23: "corrupt", 64: "empty"}
ROOT = Path(__file__).resolve().parents[1]


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 12), (i % 256, (7 * i) % 256, 100)).save(buf, "PNG")
    return buf.getvalue()


def _routes(gate: threading.Event, waiting: list[int] | None = None) -> dict:
    def image(i):
        def route(h):
            if i >= GATE_AT:
                if waiting is not None:
                    waiting.append(i)
                gate.wait()  # no timeout: no gated row is answered before the kill
            send(h, b"garbage" if BAD.get(i) == "corrupt" else _png(i))
        return route
    return {f"/{i}.png": image(i) for i in range(N_ROWS) if BAD.get(i) != "missing"}


@contextmanager
def _opened_on_exit(gate: threading.Event) -> Iterator[None]:
    """Open ``gate`` however the block ends, so that no server thread waits on it forever."""
    try:
        yield
    finally:
        gate.set()


def _manifest(path: Path, base: str) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["url", "caption"])
        w.writerows([f"{base}/{i}.png", "" if BAD.get(i) == "empty" else f"image {i}"] for i in range(N_ROWS))
    return path


def _files(out: Path) -> dict[str, bytes]:
    skip = {"stats.json", "prep_config.json"}  # hold timings and the input's path
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name not in skip}


def _cli(manifest: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "clipalign", "prep", str(manifest), "--out", str(out), "--image-col", "url",
            "--shard-size", str(SHARD), "--image-size", "8", "--timeout", "30", "--workers", "2", "--threads", "2",
            *extra]


def test_sigkill_then_rerun_resumes(tmp_path, read_shards):
    gate, waiting = threading.Event(), []
    with LoopbackServer(_routes(gate, waiting)) as server, _opened_on_exit(gate):
        manifest = _manifest(tmp_path / "m.csv", server.base)
        out = tmp_path / "out"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen(_cli(manifest, out), cwd=ROOT, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

        def killable() -> bool:
            # Every shard before the gate is complete, a worker waits inside the gated rows, and its
            # partial shard is on disk: the moment a node failure would cost the most.
            return (len(list(out.glob("*_stats.json"))) >= GATE_AT // SHARD and bool(waiting)
                    and bool(list(out.glob("*.tmp"))))

        deadline = time.monotonic() + 60
        while not killable():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the run never reached the gate"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its workers die at once, as on a node failure
        proc.wait()
        gate.set()
        done = sorted(p.name for p in out.glob("*_stats.json"))
        assert done == [f"{i:05d}_stats.json" for i in range(GATE_AT // SHARD)]
        assert list(out.glob("*.tmp")) and not (out / "stats.json").exists()  # partial work was on disk
        before = {name: (out / name).stat().st_mtime_ns for name in ("00000.tar", "00004.tar")}

        subprocess.run(_cli(manifest, out), cwd=ROOT, env=env, check=True, capture_output=True)
        ref = tmp_path / "ref"
        run_prep(open_records(manifest, image_col="url"), ref,
                 PrepConfig(SampleConfig(image_size=8), shard_size=SHARD, workers=1, threads=1))

    stats = json.loads((out / "stats.json").read_text())
    assert stats["resumed_shards"] == GATE_AT // SHARD and stats["shards"] == N_ROWS // SHARD
    assert {name: (out / name).stat().st_mtime_ns for name in before} == before  # complete shards were kept
    assert not list(out.glob("*.tmp*"))
    assert _files(out) == _files(ref)
    samples = read_shards([out / f"{i:05d}.tar" for i in range(N_ROWS // SHARD)])
    assert [int(s["__key__"]) for s in samples] == [i for i in range(N_ROWS) if i not in BAD]
    assert stats["skipped_by_reason"] == {"empty_caption": 1, "http_not_found": 1, "undecodable_image": 1}


def test_rerun_of_a_finished_run_redoes_nothing_and_options_must_match(tmp_path):
    for i in range(6):
        Image.new("RGB", (10, 10), (i, 0, 0)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"c{i}")
    out = tmp_path / "out"
    config = PrepConfig(SampleConfig(image_size=8), shard_size=4)
    assert run_prep(open_records(tmp_path), out, config)["resumed_shards"] == 0
    first = _files(out)
    again = run_prep(open_records(tmp_path), out, PrepConfig(SampleConfig(image_size=8), shard_size=4, workers=2))
    assert again["resumed_shards"] == 2 and again["written"] == 6 and _files(out) == first
    with pytest.raises(ResumeMismatch, match="sample"):
        run_prep(open_records(tmp_path), out, PrepConfig(SampleConfig(image_size=16), shard_size=4))


@pytest.mark.parametrize("workers", [2, 3])
def test_output_does_not_depend_on_workers_or_threads(tmp_path, workers):
    for i in range(9):
        Image.new("RGB", (10 + i, 10), (20 * i, 0, 0)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"c{i % 4}")
    (tmp_path / "3.png").write_bytes((tmp_path / "1.png").read_bytes())  # a duplicate
    outs = []
    for w, t in ((1, 1), (workers, 3)):
        out = tmp_path / f"out{w}"
        run_prep(open_records(tmp_path), out,
                 PrepConfig(SampleConfig(image_size=8, tokenize=None), shard_size=2, workers=w, threads=t, dedup=True))
        outs.append(_files(out))
    assert outs[0] == outs[1] and len(outs[0]) == 5 * 3 + 2


def _die_on_shard_1(job, *args):
    if job.shard_id == 1:
        os._exit(1)  # as the out-of-memory killer ends a worker: no exception, no result
    return run_job(job, *args)


def test_a_worker_that_dies_stops_the_run_in_one_error_and_a_rerun_completes(tmp_path, monkeypatch):
    for i in range(8):
        Image.new("RGB", (10, 10), (30 * i, 0, 0)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"c{i}")
    config = PrepConfig(SampleConfig(image_size=8, tokenize=None), shard_size=2, workers=2)
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr("data_prep.prep.run_job", _die_on_shard_1)  # the forked workers inherit it
        with pytest.raises(WorkerDied, match="run the same command again"):  # multiprocessing.Pool waited forever
            run_prep(open_records(tmp_path), out, config)
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]
    assert run_prep(open_records(tmp_path), out, config)["written"] == 8
    reference = tmp_path / "reference"
    run_prep(open_records(tmp_path), reference, PrepConfig(SampleConfig(image_size=8, tokenize=None), shard_size=2))
    assert _files(out) == _files(reference)  # nothing lost or doubled
