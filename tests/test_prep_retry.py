"""``--retry-failed``: only the rows that failed for a retryable reason are fetched again, only
their shards are rewritten, and the result is the run those rows would have given the first
time; and a write that fails (a file-size limit) leaves one line and no temporary file."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from clipalign.cli import main as clipalign
from data_prep.fetch import FetchConfig
from data_prep.manifest import Manifest
from data_prep.prep import PrepConfig, run_prep
from data_prep.fetch import is_retryable
from data_prep.sample import SampleConfig
from tests.prep_server import LoopbackServer, send

ROOT = Path(__file__).resolve().parents[1]
SHARD = 4
# row -> what its URL answers while the server is down: a retryable status, a truncated body,
# or a final answer (404, 403) that no retry changes
DOWN = {1: 503, 5: 429, 6: "truncated", 9: 404, 10: 403}
N_ROWS = 16  # 4 shards: 0 and 1 have retryable failures, 2 only final ones, 3 none
NOT_TIMING = ("duration_s", "samples_per_s", "output", "resumed_shards", "retried_rows")


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 12), (20 * i % 256, 90, 7 * i % 256)).save(buf, "PNG")
    return buf.getvalue()


def _routes(state: dict) -> dict:
    def image(i: int):
        def route(h):
            answer = DOWN.get(i) if state["down"] or DOWN.get(i) in (404, 403) else None
            if answer == "truncated":
                send(h, _png(i)[:20], length=len(_png(i)))
            elif answer is not None:
                send(h, b"busy", "text/plain", answer)
            else:
                send(h, _png(i))
        return route
    return {f"/{i}.png": image(i) for i in range(N_ROWS)}


def _manifest(path: Path, base: str) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["url", "caption"])
        w.writerows([f"{base}/{i}.png", f"image {i}"] for i in range(N_ROWS))
    return path


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "stats.json"}


def _stats(out: Path) -> dict:
    """stats.json without its timings and the run's process count (the output does not depend on it)."""
    stats = json.loads((out / "stats.json").read_text())
    stats["config"].pop("workers")
    return {k: v for k, v in stats.items() if k not in NOT_TIMING}


CONFIG = PrepConfig(SampleConfig(image_size=8, fetch=FetchConfig(timeout=5.0, retries=0)), shard_size=SHARD, threads=2)


def test_retryable_reasons():
    assert is_retryable("connection_error", "curl error 7: Failed to connect") and is_retryable("timeout", "x")
    assert is_retryable("truncated_download", None)
    assert is_retryable("http_error", "HTTP 503") and is_retryable("http_error", "HTTP 429")
    assert not is_retryable("http_error", "HTTP 403") and not is_retryable("http_error", "more than 10 redirects")
    for reason in ("http_not_found", "robots_noai", "not_an_image", "too_large", "undecodable_image", "duplicate",
                   "missing_image", "bad_row", None):
        assert not is_retryable(reason, "HTTP 503")


def test_retry_failed_refetches_only_retryable_rows_and_rewrites_only_their_shards(tmp_path):
    state = {"down": True}
    with LoopbackServer(_routes(state)) as server:
        manifest = _manifest(tmp_path / "m.csv", server.base)
        out = tmp_path / "out"
        first = run_prep(Manifest(manifest, image_col="url"), out, CONFIG)
        assert first["skipped_by_reason"] == {"http_error": 3, "http_not_found": 1, "truncated_download": 1}
        before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("0000[23]*")}
        hits = dict(server.hits)

        state["down"] = False
        assert clipalign(["prep", str(manifest), "--out", str(out), "--image-col", "url", "--image-size", "8",
                          "--shard-size", str(SHARD), "--timeout", "5", "--retries", "0", "--threads", "2",
                          "--workers", "2", "--retry-failed"]) == 0  # two processes; the reference, one
        refetched = {int(p[1:-4]) for p, n in server.hits.items() if n > hits.get(p, 0)}
        assert refetched == {1, 5, 6}  # not the 404 and 403 rows, nor any good one
        ref = tmp_path / "ref"
        run_prep(Manifest(manifest, image_col="url"), ref, CONFIG)  # the server up from the start

    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("0000[23]*")} == before
    assert _files(out) == _files(ref) and _stats(out) == _stats(ref)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["written"] == first["written"] + 3 and stats["retried_rows"] == 3
    assert stats["skipped_by_reason"] == {"http_error": 1, "http_not_found": 1} and stats["resumed_shards"] == 2
    assert not list(out.glob("*.tmp*"))
    again = run_prep(Manifest(manifest, image_col="url"), out, CONFIG, retry_failed=True)
    assert again["retried_rows"] == 0 and again["resumed_shards"] == N_ROWS // SHARD  # nothing left to retry


def test_a_refetched_image_already_written_is_a_duplicate(tmp_path):
    state = {"down": True}
    routes = _routes(state)
    routes["/1.png"] = lambda h: send(h, b"busy", "text/plain", 503) if state["down"] else send(h, _png(12))
    with LoopbackServer(routes) as server:
        manifest = Manifest(_manifest(tmp_path / "m.csv", server.base), image_col="url")
        config = PrepConfig(CONFIG.sample, shard_size=SHARD, threads=2, dedup=True)
        out = tmp_path / "out"
        run_prep(manifest, out, config)
        state["down"] = False
        stats = run_prep(manifest, out, config, retry_failed=True)
    errors = {e["index"]: e["reason"] for e in map(json.loads, (out / "errors.jsonl").read_text().splitlines())}
    assert errors[1] == "duplicate"  # row 12 (shard 3) holds the same image, written first
    assert stats["written"] == N_ROWS - len(DOWN) + 2  # rows 5 and 6 came back, row 1 did not


def test_a_file_size_limit_fails_in_one_line_naming_the_file_and_leaves_no_temporary_file(tmp_path):
    for i in range(8):
        Image.frombytes("RGB", (48, 48), os.urandom(48 * 48 * 3)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"caption {i}")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "clipalign", "prep", str(tmp_path), "--out", str(out), "--image-size", "48",
               "--format", "png", "--shard-size", "4"]
    # 16 KiB a file: the prep_config.json fits, a shard of 4 noisy 48x48 PNGs does not
    limited = subprocess.run(["bash", "-c", 'ulimit -f 16 && exec "$@"', "bash", *command], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert limited.returncode == 2, limited.stderr
    lines = limited.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{out / '00000.tar'}: File too large" in lines[0]
    assert sorted(p.name for p in out.iterdir()) == ["prep_config.json"]  # nothing half-written, no .tmp
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=120)
    assert json.loads((out / "stats.json").read_text())["written"] == 8  # the same command, unlimited, completes


def test_ray_missing_is_one_line(tmp_path, capsys, monkeypatch):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    assert clipalign(["prep", str(tmp_path), "--out", str(tmp_path / "out"), "--engine", "ray"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'clipalign[ray]'" in err[0]
    assert not (tmp_path / "out").exists()  # refused before anything was written
