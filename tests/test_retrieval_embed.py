"""Chunked, resumable embedding of shards and image folders; bad images counted and skipped."""
import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest

from clipalign.checkpoint import load_model
from clipalign.formats.folders import EmbeddingsFolder
from retrieval.embed import embed_collection, load_embeddings
from retrieval.identity import model_identity
from retrieval.sources import folder_units, read_image_bytes, shard_units
from tests.retrieval_toy import make_checkpoint
from tests.toydata import square_image, truncate_mid_member, write_toy_shards


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    model, transform, tokenizer, meta = load_model(make_checkpoint(tmp_path_factory.mktemp("m") / "checkpoint.pt"))
    return model, transform, tokenizer, model_identity(meta["model_name"], model.state_dict())


def _embed(model, units, out, **kw):
    m, tf, tok, ident = model
    return embed_collection(m, tf, tok, units, out, identity=ident, batch_size=8, **kw)


def test_shards_embed_into_chunks_with_metadata(tmp_path, model):
    shards = write_toy_shards(tmp_path / "shards", n=40, per_shard=16)
    summary = _embed(model, shard_units(shards), tmp_path / "emb")
    assert summary == {"units": 3, "done": 3, "count": 40, "skipped": {}}
    emb = EmbeddingsFolder(tmp_path / "emb")
    assert np.load(emb.image_vectors("00000")).dtype == np.float16
    table = pq.read_table(emb.metadata("00001"))
    assert table.column_names == ["key", "caption", "source", "shard", "offset", "size"] and table.num_rows == 16
    vectors, rows, info = load_embeddings(tmp_path / "emb")
    assert vectors["image"].shape == vectors["caption"].shape == (40, info["dim"])
    assert np.allclose(np.linalg.norm(vectors["image"], axis=1), 1, atol=2e-3)
    assert rows[17]["key"] == "000000017" and rows[17]["caption"] == "a green square" and rows[17]["source"] == "img/17.jpg"
    # (shard, offset, size) point at the very bytes of the image inside the tar
    with tarfile.open(shards[1]) as tar:
        assert read_image_bytes(rows[17]) == tar.extractfile("000000017.jpg").read()


def test_a_killed_run_resumes_and_matches_a_full_run(tmp_path, model):
    shards = write_toy_shards(tmp_path / "shards", n=48, per_shard=16)
    full = _embed(model, shard_units(shards), tmp_path / "full", dtype="float32")
    batches = []

    def die_in_the_second_unit(n):
        batches.append(n)
        if len(batches) == 3:  # units have two batches of 8: this is inside unit 00001
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _embed(model, shard_units(shards), tmp_path / "part", dtype="float32", on_batch=die_in_the_second_unit)
    part = EmbeddingsFolder(tmp_path / "part")
    assert [part.done(u).is_file() for u in ("00000", "00001", "00002")] == [True, False, False]
    with pytest.raises(ValueError, match="not embedded yet"):
        load_embeddings(tmp_path / "part")
    redone = []
    resumed = _embed(model, shard_units(shards), tmp_path / "part", dtype="float32", on_batch=redone.append)
    assert resumed == full and sum(redone) == 32  # only the two unfinished units were embedded again
    a, rows_a, _ = load_embeddings(tmp_path / "full")
    b, rows_b, _ = load_embeddings(tmp_path / "part")
    assert np.allclose(a["image"], b["image"], atol=1e-5) and rows_a == rows_b


def test_resuming_with_another_model_is_refused(tmp_path, model):
    shards = write_toy_shards(tmp_path / "shards", n=16, per_shard=16)
    _embed(model, shard_units(shards), tmp_path / "emb")
    m, tf, tok, ident = model
    with pytest.raises(ValueError, match="another model"):
        embed_collection(m, tf, tok, shard_units(shards), tmp_path / "emb", identity={**ident, "weights_sha256": "x"})


def test_unreadable_images_and_torn_shards_are_counted_and_skipped(tmp_path, model):
    shards = write_toy_shards(tmp_path / "shards", n=32, per_shard=16)
    bad = tmp_path / "shards" / "00002.tar"
    with tarfile.open(bad, "w") as tar:
        for key, data in (("a", b"not a jpeg"), ("b", _jpeg())):
            for ext, payload in (("jpg", data), ("txt", b"caption")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    truncate_mid_member(shards[1], 5)
    summary = _embed(model, shard_units(shards + [str(bad)]), tmp_path / "emb")
    assert summary["skipped"] == {"undecodable_image": 1, "truncated_shard": 1}
    _, rows, _ = load_embeddings(tmp_path / "emb")
    # shard 0; of shard 1 the one whole sample before the tear (members 0-2; member 5 is torn); "b"
    assert summary["count"] == len(rows) == 16 + 1 + 1
    assert rows[-1]["key"] == "b"


def _jpeg():
    buf = io.BytesIO()
    square_image("red", np.random.default_rng(0)).save(buf, "JPEG")
    return buf.getvalue()


def test_an_image_folder_with_caption_files(tmp_path, model):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i, colour in enumerate(("red", "blue", "green")):
        square_image(colour, np.random.default_rng(i)).save(folder / "sub" / f"{colour}.png")
        (folder / "sub" / f"{colour}.txt").write_text(f"a {colour} square\n")
    (folder / "broken.jpg").write_bytes(b"nope")
    units = folder_units(folder, per_unit=2)
    assert [len(u.files) for u in units] == [2, 2]
    summary = _embed(model, units, tmp_path / "emb", captions=True)
    assert summary["count"] == 3 and summary["skipped"] == {"undecodable_image": 1}
    _, rows, info = load_embeddings(tmp_path / "emb")
    assert [r["caption"] for r in rows] == ["a blue square", "a green square", "a red square"]
    assert rows[0]["source"].endswith("sub/blue.png") and json.loads(EmbeddingsFolder(tmp_path / "emb").info.read_text())


def test_a_caption_is_cut_to_a_bound_the_tokenizer_never_reaches(model):
    from clipalign.formats.sample import caption_char_limit, cut_caption

    _, _, tokenizer, _ = model
    limit = caption_char_limit(tokenizer.context_length)
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghij"), rng.integers(1, 30))) for _ in range(3000)]
    captions = [" ".join(words), "x" * 20_000, "a" + " " * 50_000 + "red square " * 2000,
                "&amp; " * 3000 + "a red square", "ünïcödé " * 2000]
    for caption in captions:
        cut = cut_caption(caption, limit)
        assert len(cut.replace(" ", "")) <= limit < len(caption)
        assert np.array_equal(tokenizer([cut]), tokenizer([caption]))  # what the tokenizer keeps is unchanged
    assert cut_caption("a  red\tsquare ", limit) == "a  red\tsquare "  # short captions are left alone


def test_a_50_mb_caption_is_cut_before_it_is_tokenised_or_stored(tmp_path, model):
    import time

    import webdataset as wds

    from clipalign.formats.sample import caption_char_limit

    _, _, tokenizer, _ = model
    (tmp_path / "shards").mkdir()
    with wds.TarWriter(str(tmp_path / "shards" / "00000.tar")) as sink:
        sink.write({"__key__": "huge", "jpg": _jpeg(), "txt": "a red square " + "and more " * ((50 << 20) // 9)})
        sink.write({"__key__": "small", "jpg": _jpeg(), "txt": "a red square"})
    t0 = time.perf_counter()
    summary = _embed(model, shard_units([str(tmp_path / "shards" / "00000.tar")]), tmp_path / "emb")
    assert summary["count"] == 2 and time.perf_counter() - t0 < 60
    vectors, rows, _ = load_embeddings(tmp_path / "emb")
    assert len(rows[0]["caption"]) <= 2 * caption_char_limit(tokenizer.context_length)  # with a space a word
    assert rows[1]["caption"] == "a red square"
    assert rows[0]["caption"].startswith("a red square and more")
