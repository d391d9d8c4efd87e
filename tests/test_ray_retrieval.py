"""``--engine ray`` for embed and index: on a local two-node cluster, the same folders the local engine writes."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipalign.cli import main
from clipalign.cluster import RAY_MISSING, connect
from clipalign.formats.folders import EmbeddingsFolder, IndexFolder
from clipalign.model_source import ModelSource
from retrieval.embed import embed_and_write, embed_folder, resolve_units
from retrieval.embeddings import Embeddings
from retrieval.engine import open_engine
from retrieval.index import build_indexes
from retrieval.ray_embed import embed_on_ray
from retrieval.ray_index import build_indexes_on_ray, task_errors
from tests.retrieval_toy import clustered, make_checkpoint
from tests.toydata import write_toy_shards

TIMED = ("latency_ms", "build_s")  # what a build measures of itself, never the same twice


@pytest.fixture(scope="module")
def ray(ray_cluster):
    ray = connect(ray_cluster)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A checkpoint, three shards of 16 images, and their embeddings made by the local engine."""
    root = tmp_path_factory.mktemp("ray_retrieval")
    ckpt = make_checkpoint(root / "checkpoint.pt")
    write_toy_shards(root / "shards", n=48, per_shard=16)
    embed_folder(ckpt, root / "shards", root / "local_emb", dtype="float32", batch_size=8)
    return {"root": root, "checkpoint": ckpt, "shards": root / "shards", "local_emb": root / "local_emb"}


def test_a_dead_cluster_address_is_one_line(world, capsys, tmp_path):  # first: before this module connects
    assert main(["index", "--embeddings", str(world["local_emb"]), "--out", str(tmp_path / "out"), "--engine", "ray",
                 "--ray-address", "127.0.0.1:1"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "no Ray cluster answers at 127.0.0.1:1" in lines[0]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_ray_embedding_writes_the_local_files_byte_for_byte(world, ray, ray_cluster):
    out = world["root"] / "ray_emb"
    assert main(["embed", "--checkpoint", str(world["checkpoint"]), "--data", str(world["shards"]), "--out", str(out),
                 "--dtype", "float32", "--batch-size", "8", "--no-progress", "--engine", "ray",
                 "--ray-address", ray_cluster]) == 0  # two actors, one per node
    local, remote = _files(world["local_emb"]), _files(out)
    assert sorted(remote) == sorted(local) and len([f for f in local if f.startswith("img_emb/")]) == 3
    for name in local:
        if name.endswith(".npy"):  # the same batches through the same model: the very same float32 vectors
            assert np.array_equal(np.load(out / name), np.load(world["local_emb"] / name)), name
    assert remote == local  # metadata, done records, info and model copy too


def test_a_ray_rerun_embeds_only_the_unfinished_chunks(world, ray, ray_cluster, tmp_path):
    out = tmp_path / "emb"
    shutil.copytree(world["local_emb"], out)
    layout = EmbeddingsFolder(out)
    layout.done("00001").unlink()  # as if killed while writing unit 00001
    layout.image_vectors("00001").write_bytes(b"torn")
    untouched = {p: p.stat().st_mtime_ns for p in (layout.image_vectors("00000"), layout.metadata("00002"))}
    counted: list[int] = []
    embed_folder(world["checkpoint"], world["shards"], out, dtype="float32", batch_size=8, engine="ray",
                 ray_address=ray_cluster, actors=1, progress=lambda **_: _Bar(counted))
    assert counted == [16]  # one unit of 16 images was embedded again
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched
    assert _files(out) == _files(world["local_emb"])


def test_an_actor_that_loads_other_weights_stops_the_run(world, ray, ray_cluster, tmp_path):
    units = resolve_units(world["shards"])[:1]
    with pytest.raises(ValueError) as err:
        embed_on_ray(ModelSource(checkpoint=str(world["checkpoint"])), {"name": "ca-nano", "weights_sha256": "0"}, units,
                     tmp_path / "emb", embed_and_write, captions=True, dtype="float32", batch_size=8, precision="fp32",
                     address=ray_cluster, actors=1)
    # the actor's own error, its first line the one the CLI prints (Ray Data appends its advice below)
    assert str(err.value).splitlines()[0] == (f"{world['checkpoint']} now holds weights {_weights(world)}, "
                                              "not the 0 this run started with")
    assert not EmbeddingsFolder(tmp_path / "emb").done(units[0].name).exists()


def _weights(world: dict[str, Path]) -> str:
    return json.loads(EmbeddingsFolder(world["local_emb"]).info.read_text())["model"]["weights_sha256"]


def test_a_task_error_arrives_as_itself(ray):
    @ray.remote(max_retries=0)
    def read_part() -> None:
        raise ValueError("/data/emb/img_emb/00003.npy holds float64 (3,)")

    with pytest.raises(ValueError, match=r"^/data/emb/img_emb/00003\.npy holds float64 \(3,\)$"):
        with task_errors():
            ray.get(read_part.remote())


class _Bar:
    def __init__(self, counted: list[int]) -> None:
        self.counted = counted

    def update(self, n: int) -> None:
        self.counted.append(n)

    def close(self) -> None:
        pass


def _synthetic_embeddings(world: dict[str, Path], out: Path, n: int = 2000, per_unit: int = 500) -> Path:
    """An embeddings folder of ``n`` clustered float16 vectors in units of ``per_unit``, made with
    the world's model (its info and model copy), for index builds with real inverted lists."""
    src, dst = EmbeddingsFolder(world["local_emb"]), EmbeddingsFolder(out)
    info = json.loads(src.info.read_text())
    names = [f"{i:05d}" for i in range(n // per_unit)]
    info |= {"dtype": "float16", "captions": False,
             "units": [{"name": u, "shard": f"/data/{u}.tar", "files": [], "root": ""} for u in names]}
    for d in ("img_emb", "metadata", "done"):
        (out / d).mkdir(parents=True)
    vectors = clustered(n, info["dim"], seed=3).astype(np.float16)
    for i, u in enumerate(names):
        np.save(dst.image_vectors(u), vectors[i * per_unit : (i + 1) * per_unit])
        rows = range(i * per_unit, (i + 1) * per_unit)
        pq.write_table(pa.table({"key": [f"{r:09d}" for r in rows], "caption": [f"vector {r}" for r in rows],
                                 "source": [""] * per_unit, "shard": [f"/data/{u}.tar"] * per_unit,
                                 "offset": list(rows), "size": [1] * per_unit}), dst.metadata(u))
        dst.done(u).write_text(json.dumps({"count": per_unit, "skipped": {}}))
    dst.info.write_text(json.dumps(info))
    shutil.copyfile(src.model, dst.model)
    return out


@pytest.fixture(scope="module")
def synthetic(world, tmp_path_factory) -> Path:
    return _synthetic_embeddings(world, tmp_path_factory.mktemp("synthetic") / "emb")


def _info_untimed(folder: Path) -> dict:
    info = json.loads(IndexFolder(folder).info.read_text())
    for stats in info["indexes"].values():
        for field in TIMED:
            stats.pop(field)
    return info


def _untimed(stats: dict) -> dict:
    return {t: {f: v for f, v in s.items() if f not in TIMED} for t, s in stats.items()}


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpqfs"])
def test_a_ray_index_is_the_single_process_index(kind, synthetic, ray, ray_cluster):
    # 7 parts of 300 rows (across the 500-row units) filled as Ray tasks on both nodes and merged
    # in order, against one index filled whole in this process
    embeddings = Embeddings.open(synthetic)
    whole, whole_stats = build_indexes({"image": embeddings.vectors("image")}, 2000, kind=kind)
    parts, parts_stats = build_indexes_on_ray(embeddings, kind=kind, part_rows=300, address=ray_cluster)
    assert np.array_equal(faiss.serialize_index(parts["image"]), faiss.serialize_index(whole["image"]))  # byte for byte
    assert _untimed(parts_stats) == _untimed(whole_stats)  # the same sample, queries, tuning and recall
    queries = clustered(20, 64, seed=9)
    (d1, i1), (d2, i2) = parts["image"].search(queries, 10), whole["image"].search(queries, 10)
    assert np.array_equal(i1, i2) and np.array_equal(d1, d2) and (i1 >= 0).all()


def test_the_index_cli_on_ray_writes_the_local_folder(synthetic, ray, ray_cluster, tmp_path):
    remote, local = tmp_path / "ray", tmp_path / "local"
    for out, engine in ((remote, ["--engine", "ray", "--ray-address", ray_cluster]), (local, [])):
        assert main(["index", "--embeddings", str(synthetic), "--out", str(out), "--index", "ivf", *engine]) == 0
    a, b = _files(remote), _files(local)
    assert sorted(a) == sorted(b) == ["image.faiss", "image_query.onnx", "info.json", "metadata.arrow",
                                      "model.pt", "text_query.onnx"]
    assert {f: a[f] for f in a if f != "info.json"} == {f: b[f] for f in b if f != "info.json"}
    assert _info_untimed(remote) == _info_untimed(local)  # the same tuning and file digests
    engine = open_engine(remote)  # the folder passes the engine's checks of its files and model
    assert engine.index.info["count"] == 2000 and engine.index.rows([1999])[0]["key"] == "000001999"


def test_an_hnsw_graph_is_not_built_in_parts(synthetic):
    with pytest.raises(ValueError, match="--engine local"):
        build_indexes_on_ray(Embeddings.open(synthetic), kind="hnsw")


@pytest.mark.parametrize("command", ["embed", "index"])
def test_ray_missing_is_one_line(command, world, monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails, as where it is not installed
    source = ["--embeddings", str(world["local_emb"])] if command == "index" else [
        "--checkpoint", str(world["checkpoint"]), "--data", str(world["shards"])]
    assert main([command, *source, "--out", str(tmp_path / "out"), "--engine", "ray"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"clipalign {command}: error: {RAY_MISSING}"]
    assert not (tmp_path / "out").exists()
