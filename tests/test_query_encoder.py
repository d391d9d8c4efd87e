"""retrieval.query_encoder: the torch-free tokenizer gives open_clip's ids, and the ONNX text tower is
kept only where onnxruntime reproduces the model, never without onnxruntime or for another tokenizer."""
from __future__ import annotations

import json
import logging
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer

import clipalign.export_onnx
from clipalign.formats.folders import IndexFolder
from clipalign.model_source import load_model_source
from retrieval.identity import model_identity
from retrieval.query_encoder import TOKENIZER, export_text_query, load_text_query, tokenize
from tests.retrieval_toy import make_checkpoint

# what ftfy, html.unescape, the whitespace clean-up, lower-casing and the byte-level BPE each see differently
_ALPHABET = ("abcXYZ019 .,;:!?'\"-_()[]{}<>/\\@#$%^&*+=~`|" " \t\n\r\u00a0\u2009\u200b"
             "éüñçÅØßœ" "e\u0301a\u0308" "日本語中文한국어" "العربية" "עברית" "Ελληνικά" "кириллица"
             "😀🎉👍🏽👨‍👩‍👧" "ﬁ" "ｆｕｌｌ" "ⅣⅫ" "\u00ad" "Ã©Ã¨" "™©®°±" "\x00\x07\x7f")
_FIXED = ["", " ", "\t\n", "a red circle", "A RED CIRCLE", "a  red\tcircle\n", "it's the dog's ball, isn't it?",
          "&amp; &lt;b&gt; &amp;amp; &#39;", "cafÃ© naÃ¯ve", "caf\u00e9 vs cafe\u0301", "<start_of_text>", "<end_of_text> x",
          "😀" * 50, "日本語のテキスト", "x" * 1000, "a " * 200, "supercalifragilisticexpialidocious " * 10,
          " ".join(str(i) for i in range(300)), "\u200b\u200b", "ﬁne ﬂow"]


def _strings(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return _FIXED + ["".join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, 120))) for _ in range(n)]


@pytest.mark.parametrize("context_length", [77, 32, 5])
def test_the_torch_free_tokenizer_gives_open_clips_ids(context_length):
    texts = _strings(400)
    want = SimpleTokenizer()(texts, context_length=context_length).numpy()
    got = tokenize(texts, context_length)
    assert got.dtype == np.int64 and got.shape == (len(texts), context_length)
    assert np.array_equal(got, want)
    assert all(np.array_equal(tokenize([t], context_length)[0], w) for t, w in zip(texts[:40], want[:40]))  # one at a time
    eot, truncated = SimpleTokenizer().eot_token_id, want[:, -1] != 0
    assert truncated.sum() >= 5 and (want[truncated, -1] == eot).all()  # long texts end in eot
    assert list(got[0, :3]) == [SimpleTokenizer().sot_token_id, eot, 0]  # the empty string


def test_the_tokenizer_imports_neither_torch_nor_open_clip():
    code = ("import sys; from retrieval.query_encoder import tokenize; ids = tokenize(['a red circle'], 77); "
            "print(json.dumps([ids.tolist(), 'torch' in sys.modules, 'open_clip' in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True)
    ids, has_torch, has_open_clip = json.loads(done.stdout)
    assert not has_torch and not has_open_clip
    assert ids == SimpleTokenizer()(["a red circle"]).tolist()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(model, tokenizer, identity) of an untrained ca-nano checkpoint."""
    built, _, tokenizer, meta = load_model_source(make_checkpoint(tmp_path_factory.mktemp("m") / "c.pt"))
    return built.eval(), tokenizer, model_identity(meta["model_name"], built.state_dict())


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("exported")
    built, tokenizer, identity = model
    return folder, export_text_query(built, tokenizer, folder, identity)


def test_the_onnx_tower_reproduces_the_model_at_any_batch(model, exported):
    built, tokenizer, identity = model
    folder, entry = exported
    assert entry == {"file": IndexFolder(folder).text_query.name, "tokenizer": TOKENIZER,
                     "context_length": tokenizer.context_length, "model_identity": identity}
    encode = load_text_query(folder, entry)
    texts = _strings(30, seed=1)[3:]  # not the texts it was checked on
    with torch.no_grad():
        want = built.encode_text(tokenizer(texts), normalize=True).numpy()
    for batch in (slice(0, 1), slice(0, len(texts)), slice(5, 12)):
        got = encode(texts[batch])
        assert got.dtype == np.float32 and np.abs(got - want[batch]).max() <= 1e-5


def test_the_tower_is_read_from_the_bytes_given(exported):
    folder, entry = exported
    data = IndexFolder(folder).text_query.read_bytes()
    assert np.array_equal(load_text_query("/nonexistent", entry, data)(["a red circle"]),
                          load_text_query(folder, entry)(["a red circle"]))


def test_no_fast_path_without_onnxruntime(model, exported, tmp_path, monkeypatch, caplog):
    built, tokenizer, identity = model
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    caplog.set_level(logging.INFO, logger="retrieval.query_encoder")
    assert export_text_query(built, tokenizer, tmp_path, identity) is None
    assert "no ONNX text tower: ModuleNotFoundError" in caplog.text  # the reason is logged
    assert not IndexFolder(tmp_path).text_query.exists()
    with pytest.raises(ImportError):
        load_text_query(*exported)


def test_a_tower_that_does_not_reproduce_the_model_is_not_kept(model, tmp_path, monkeypatch, caplog):
    built, tokenizer, identity = model
    caplog.set_level(logging.INFO, logger="retrieval.query_encoder")
    other, _, _, _ = load_model_source(make_checkpoint(tmp_path / "other.pt", seed=1))
    real = clipalign.export_onnx.export_tower
    monkeypatch.setattr(clipalign.export_onnx, "export_tower",
                        lambda _model, tower, example, path, **options: real(other, tower, example, path, **options))
    assert export_text_query(built, tokenizer, tmp_path, identity) is None
    assert "the ONNX text tower misses the model by" in caplog.text
    assert not IndexFolder(tmp_path).text_query.exists()


@pytest.mark.parametrize("tokenizer", [SimpleTokenizer(context_length=32, clean="canonicalize"),
                                       SimpleTokenizer(context_length=32, additional_special_tokens=["<x>"]),
                                       lambda texts: torch.zeros(len(texts), 32, dtype=torch.long)])
def test_another_tokenizer_gets_no_fast_path(model, tmp_path, tokenizer):
    assert export_text_query(model[0], tokenizer, tmp_path, model[2]) is None
    assert not IndexFolder(tmp_path).text_query.exists()


def test_a_recorded_tokenizer_of_another_kind_is_refused(exported):
    folder, entry = exported
    with pytest.raises(ValueError, match="HFTokenizer"):
        load_text_query(folder, {**entry, "tokenizer": "HFTokenizer"})
