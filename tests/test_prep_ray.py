"""``clipalign prep --engine ray``: tasks read their own rows and give the same files as a local
run, a task whose worker is killed is run again, and ``--retry-failed`` works on the cluster.

The first tests need no cluster: the rows a task reads from where ``data_prep.splits`` says its
range starts are exactly the rows the local reader gives.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import os
import random
import signal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import data_prep.manifest as manifest_module
from clipalign.cli import main as clipalign
from data_prep.fetch import FetchConfig
from data_prep.manifest import Manifest
from data_prep.ranges import read_range
from data_prep.prep import PrepConfig, run_prep
from data_prep.sample import SampleConfig
from data_prep.splits import shard_ranges
from tests.prep_server import LoopbackServer, send

NOT_TIMING = ("duration_s", "samples_per_s", "output")

# CSV rows that test the byte scan: a caption with quoted newlines and doubled quotes, a byte
# that is not UTF-8, rows that are blank (skipped, not counted), a row with too few fields.
CSV_BODY = (
    b'image,caption,license\r\n'
    b'0.png,plain,cc0\r\n'
    b'1.png,"two\nlines, and ""quotes""",cc0\n'
    b'\n'
    b'2.png,bl\xffue,cc-by\n'
    b',,\n'
    b'" ",\xc2\xa0,\n'
    b'3.png,"a ""quoted"" caption\n\n with a blank line inside",cc0\n'
    b'4.png\n'
    b'5.png,5 inch" screen,cc0\n'
    b'missing.png,gone,cc0\n'
    b'6.png,"unclosed, "then more,cc0\n'
    b'7.png,last,cc0'
)
JSONL_BODY = (
    b'\xef\xbb\xbf{"image": "0.png", "caption": "first"}\n'
    b'\n'
    b'{"image": "1.png", "caption": "bl\xffue"}\r\n'
    b'   \n'
    b'not json\n'
    b'{"image": "2.png", "caption": "x", "license": "cc0"}\n'
    b'\xc2\xa0\n'
    b'{"caption": "no image"}\n'
    b'{"image": "3.png", "caption": "last"}'
)


def _parquet(path: Path, n: int = 13) -> Path:
    rows = [{"image": None if i == 4 else f"{i}.png", "caption": f"caption {i}", "license": "cc0"} for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=3)  # ranges start inside row groups
    return path


@pytest.mark.parametrize("name", ["m.csv", "m.tsv", "m.jsonl", "m.parquet"])
def test_task_side_ranges_give_the_local_reader_rows(tmp_path, name):
    path = tmp_path / name
    if name == "m.parquet":
        _parquet(path)
    else:
        path.write_bytes(JSONL_BODY if name == "m.jsonl" else
                         CSV_BODY.replace(b",", b"\t") if name == "m.tsv" else CSV_BODY)
    manifest = Manifest(path, extra_cols=None)
    local = list(manifest.records())
    for shard_size in (1, 2, 3, 5, 100):
        ranges = shard_ranges(manifest, shard_size)
        assert [r.first_index for r in ranges] == list(range(0, len(local), shard_size))
        assert [list(read_range(manifest, r)) for r in ranges] == \
            [local[i : i + shard_size] for i in range(0, len(local), shard_size)]
    bad = [r for r in local if r.error == "bad_row"]
    if name in ("m.csv", "m.tsv"):
        assert [r.detail for r in bad] == ["line 6: byte 0xff is not UTF-8", "row has 1 fields"]
        assert local[5].caption == '5 inch" screen' and local[3].caption.startswith('a "quoted" caption\n\n')
    elif name == "m.jsonl":
        assert [r.detail for r in bad][:1] == ["line 3: byte 0xff is not UTF-8"] and len(local) == 6


def test_a_random_csv_is_split_where_the_csv_module_splits_it(tmp_path):
    """Quotes, delimiters, line ends, spaces and odd bytes in any order: the ranges' rows are the reader's."""
    tokens = [b"a", b",", b'"', b'""', b" ", b"\n", b"\r\n", b"\xff", b"\xc2\xa0", b"\t", b"x.png"]
    rng = random.Random(17)
    for case in range(300):
        path = tmp_path / f"{case}.csv"
        path.write_bytes(b"image,caption,x\n" + b"".join(rng.choice(tokens) for _ in range(rng.randint(0, 40))))
        manifest = Manifest(path, extra_cols=None)
        local = list(manifest.records())
        for shard_size in (1, 3):
            assert [r for rows in shard_ranges(manifest, shard_size) for r in read_range(manifest, rows)] == local


def test_a_header_with_a_quoted_newline_is_one_record(tmp_path):
    (tmp_path / "m.csv").write_bytes(b'"ima\nge",caption\n"a.png",first\nb.png,second\n')
    manifest = Manifest(tmp_path / "m.csv", image_col="ima\nge")
    assert [r for rows in shard_ranges(manifest, 1) for r in read_range(manifest, rows)] == \
        list(manifest.records()) and len(list(manifest.records())) == 2


def test_inputs_the_driver_reads_itself(tmp_path):
    (tmp_path / "cr.csv").write_bytes(b"image,caption\ra.png,x\r")  # lone CRs end lines only for Python's reader
    (tmp_path / "m.csv.gz").write_bytes(gzip.compress(CSV_BODY))  # no offsets to seek to in a gzip stream
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    for source in (tmp_path / "cr.csv", tmp_path / "m.csv.gz", tmp_path):
        assert shard_ranges(Manifest(source), 2) is None


# --- on the cluster ---------------------------------------------------------------------------


def test_a_dead_address_is_one_line(tmp_path, capsys):  # first: before this module connects
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    assert clipalign(["prep", str(tmp_path), "--out", str(tmp_path / "out"), "--engine", "ray",
                      "--ray-address", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "127.0.0.1:1" in err[0]


@pytest.fixture(scope="module")
def cluster(ray_cluster):
    from clipalign.cluster import connect

    ray = connect(ray_cluster)
    yield ray_cluster
    ray.shutdown()


def _images(folder: Path, n: int = 9) -> None:
    for i in range(n):
        Image.new("RGB", (12 + i, 10), (25 * i, 80, 200 - 9 * i)).save(folder / f"{i}.png")
    (folder / "7.png").write_bytes((folder / "0.png").read_bytes())  # a duplicate for --dedup


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "stats.json"}


def _stats(out: Path) -> dict:
    return {k: v for k, v in json.loads((out / "stats.json").read_text()).items() if k not in NOT_TIMING}


@pytest.mark.parametrize("name", ["m.csv", "m.parquet", "m.csv.gz"])
def test_ray_gives_the_local_files(cluster, tmp_path, name, monkeypatch):
    _images(tmp_path)
    path = tmp_path / name
    if name == "m.parquet":
        _parquet(path, 9)
    else:
        path.write_bytes(gzip.compress(CSV_BODY) if name.endswith(".gz") else CSV_BODY)
    config = PrepConfig(SampleConfig(image_size=8), shard_size=4, dedup=True)
    run_prep(Manifest(path, extra_cols=None), tmp_path / "local", config)
    parsed: list[int] = []  # the rows the driver parses (the tasks run in other processes)
    for reader in ("_delimited_rows", "_parquet_rows"):
        def counting(*args, _reader=getattr(manifest_module, reader), **kwargs):
            for record in _reader(*args, **kwargs):
                parsed.append(record.index)
                yield record
        monkeypatch.setattr(manifest_module, reader, counting)
    stats = run_prep(Manifest(path, extra_cols=None), tmp_path / "ray", config, engine="ray", ray_address=cluster)
    assert _files(tmp_path / "ray") == _files(tmp_path / "local") and _stats(tmp_path / "ray") == _stats(tmp_path / "local")
    assert stats["written"] >= 4 and stats["skipped_by_reason"]["duplicate"] == 1
    # the driver reads a .gz manifest through; of the others only the first row, with the header check
    assert sorted(set(parsed)) == (list(range(stats["seen"])) if name.endswith(".gz") else [0])
    assert not list((tmp_path / "ray").glob("*.tmp*"))


def _peer_pid(client_port: int, server_port: int) -> int | None:
    """The process holding the client end of a loopback TCP connection (read from /proc)."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, remote, inode_field = line.split()[1], line.split()[2], line.split()[9]
        if int(local.split(":")[1], 16) == client_port and int(remote.split(":")[1], 16) == server_port:
            inode = inode_field
    if inode is None:
        return None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]" for fd in os.listdir(f"/proc/{pid}/fd")):
                return int(pid)
        except OSError:  # a process that ended, or fds we may not read
            continue
    return None


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 12), (20 * i, 90, 255 - 20 * i)).save(buf, "PNG")
    return buf.getvalue()


def _url_manifest(path: Path, base: str, n: int) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["url", "caption"])
        w.writerows([f"{base}/{i}.png", f"image {i}"] for i in range(n))
    return path


def test_a_killed_worker_is_retried_and_every_good_sample_is_written_once(cluster, tmp_path, read_shards):
    kill_row, missing_row, killed, peers = 6, 9, [], []

    def image(i: int):
        def route(h):
            if i == kill_row and not killed:  # the first attempt only: SIGKILL the Ray worker fetching it
                pid = _peer_pid(h.client_address[1], h.server.server_address[1])
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes() if pid else b""
                peers.append((pid, cmdline))
                if pid is not None and pid != os.getpid() and cmdline.startswith(b"ray::"):  # a Ray worker's title
                    killed.append(pid)
                    os.kill(pid, signal.SIGKILL)
                    return
            send(h, _png(i))
        return route

    routes = {f"/{i}.png": image(i) for i in range(12) if i != missing_row}
    with LoopbackServer(routes) as server:
        manifest = Manifest(_url_manifest(tmp_path / "m.csv", server.base, 12), image_col="url")
        config = PrepConfig(SampleConfig(image_size=8, fetch=FetchConfig(timeout=10.0, retries=0)), shard_size=4,
                            threads=2)
        stats = run_prep(manifest, tmp_path / "ray", config, engine="ray", ray_address=cluster)
        assert len(killed) == 1, peers
        assert server.hits[f"/{kill_row}.png"] == 2  # killed once, fetched again
        run_prep(manifest, tmp_path / "local", config)
    samples = read_shards([tmp_path / "ray" / f"{i:05d}.tar" for i in range(3)], decode=False)
    assert [int(s["__key__"]) for s in samples] == [i for i in range(12) if i != missing_row]
    assert stats["written"] == 11 and stats["skipped_by_reason"] == {"http_not_found": 1}
    assert _files(tmp_path / "ray") == _files(tmp_path / "local") and _stats(tmp_path / "ray") == _stats(tmp_path / "local")
    assert not list((tmp_path / "ray").glob("*.tmp*"))  # the killed attempt's partial tar is gone


def test_retry_failed_on_the_cluster(cluster, tmp_path, capsys):
    down = {"now": True}

    def image(i: int):
        return lambda h: send(h, b"busy", "text/plain", 503) if down["now"] and i in (1, 6) else send(h, _png(i))

    with LoopbackServer({f"/{i}.png": image(i) for i in range(8)}) as server:
        manifest = _url_manifest(tmp_path / "m.csv", server.base, 8)
        args = [str(manifest), "--image-col", "url", "--image-size", "8", "--shard-size", "4", "--retries", "0",
                "--threads", "2"]
        out = tmp_path / "ray"
        assert clipalign(["prep", *args, "--out", str(out), "--engine", "ray", "--ray-address", cluster]) == 0
        assert json.loads((out / "stats.json").read_text())["skipped_by_reason"] == {"http_error": 2}
        down["now"] = False
        assert clipalign(["prep", *args, "--out", str(out), "--engine", "ray", "--ray-address", cluster,
                          "--retry-failed"]) == 0
        assert clipalign(["prep", *args, "--out", str(tmp_path / "local")]) == 0
    assert "fetched 2 failed row(s) again" in capsys.readouterr().out
    assert _files(out) == _files(tmp_path / "local")
    assert {k: v for k, v in _stats(out).items() if k not in ("resumed_shards", "retried_rows")} == \
        {k: v for k, v in _stats(tmp_path / "local").items() if k not in ("resumed_shards", "retried_rows")}
