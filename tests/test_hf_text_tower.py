"""A text tower from a local Hugging Face folder: a tiny random BERT (with its masked-LM head,
and bare) written here with its own WordPiece vocabulary, an image tower from a model config
beside it. Nothing is downloaded: the network is cut while the models build."""
from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.hf_model import HFTextEncoder
from toydata import COLOURS, square_image, write_toy_shards
from transformers import BertConfig, BertForMaskedLM, BertModel, BertTokenizerFast

from clipalign import factory
from clipalign.checkpoint import load_model
from clipalign.data import SampleDecoder
from clipalign.formats.folders import RunFolder
from clipalign.hf_text import HfTokenizer
from clipalign.masking import IGNORE_INDEX, mask_tokens, masking_ids
from clipalign.model import MlmHead
from clipalign.train import Trainer
from clipalign.train_config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
SPECIALS = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["a", "the", "square", "circle", "star", "photo", "of", "on", "small", *COLOURS]
LETTERS = "bcdefghijklmnopqrstuvwxyz"  # "a" is a word already
# Special ids in the middle of the vocabulary too, as in BERT's ([UNK] 100, [CLS] 101, ...)
VOCAB = SPECIALS[:1] + WORDS[:4] + SPECIALS[1:] + WORDS[4:] + [f"##{c}" for c in "a" + LETTERS] + list(LETTERS + ".,")
VISION = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16}
TEXT = {"hf_pooler_type": "cls_last_hidden_state_pooler", "hf_proj_type": "linear", "context_length": 16}


def _write_bert(folder: Path, kind: type) -> Path:
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    kind(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def towers(tmp_path_factory) -> dict[str, Path]:
    """Two registered model configs: ``hf-bert-mlm-nano`` (a ``BertForMaskedLM`` folder) and
    ``hf-bert-bare-nano`` (a ``BertModel`` folder), named by paths relative to the configs."""
    root = tmp_path_factory.mktemp("hf")
    folders = {"hf-bert-mlm-nano": _write_bert(root / "bert-mlm", BertForMaskedLM),
               "hf-bert-bare-nano": _write_bert(root / "bert-bare", BertModel)}
    for name, folder in folders.items():
        text = {**TEXT, "hf_model_name": folder.name, "hf_tokenizer_name": folder.name}
        (root / f"{name}.json").write_text(json.dumps({"embed_dim": 32, "vision_cfg": VISION, "text_cfg": text}))
        assert factory.add_model_config(root / f"{name}.json") == [name]
    return folders


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access while building: {args}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in RunFolder(run).metrics.read_text().splitlines()]


def _build(name: str) -> tuple:
    torch.manual_seed(0)
    return factory.create_model(name).eval(), factory.get_tokenizer(name)


def _masked(tok, model, texts: list[str], seed: int = 0, rate: float = 0.3):
    ids = tok(texts)
    masked, labels = mask_tokens(ids, **masking_ids(tok, model.mask_id), rate=rate,
                                 generator=torch.Generator().manual_seed(seed))
    return ids, masked, labels


def test_the_model_builds_from_the_local_folder_with_its_weights_and_tokenizer(towers, offline):
    model, tok = _build("hf-bert-mlm-nano")
    assert isinstance(model.clip.text, HFTextEncoder) and isinstance(tok, HfTokenizer)
    theirs = BertModel.from_pretrained(towers["hf-bert-mlm-nano"]).state_dict()
    ours = model.clip.text.transformer.state_dict()
    assert theirs.keys() - {"pooler.dense.weight", "pooler.dense.bias"} <= ours.keys()
    assert all(torch.equal(ours[k], v) for k, v in theirs.items() if k in ours)  # the folder's weights, not random
    ids = tok(["a red square", "the small blue star"])
    assert ids.shape == (2, 16)
    assert ids[0, :5].tolist() == [VOCAB.index(t) for t in ("[CLS]", "a", "red", "square", "[SEP]")]
    assert (ids[0, 5:] == VOCAB.index("[PAD]")).all()
    assert tok.special_ids == tuple(sorted(VOCAB.index(t) for t in SPECIALS if t != "[unused0]"))
    assert model.encode_text(ids, normalize=True).shape == (2, 32)


def test_a_text_tower_that_is_no_local_folder_is_refused_without_a_download(tmp_path, offline):
    text = {**TEXT, "hf_model_name": "bert-base-uncased", "hf_tokenizer_name": "bert-base-uncased"}
    (tmp_path / "hf-hub-named.json").write_text(json.dumps({"embed_dim": 32, "vision_cfg": VISION, "text_cfg": text}))
    factory.add_model_config(tmp_path / "hf-hub-named.json")
    with pytest.raises(FileNotFoundError, match="not a local Hugging Face folder"):
        factory.create_model("hf-hub-named")
    with pytest.raises(FileNotFoundError, match="not a local Hugging Face folder"):
        factory.get_tokenizer("hf-hub-named")


def test_the_mlm_head_and_mask_id_are_the_folders_own(towers, offline):
    model, tok = _build("hf-bert-mlm-nano")
    hf = BertForMaskedLM.from_pretrained(towers["hf-bert-mlm-nano"]).eval()
    assert model.mask_id == tok.mask_token_id == VOCAB.index("[MASK]")
    head = model.mlm_head.state_dict()
    assert head.keys() == hf.cls.state_dict().keys()
    assert all(torch.equal(head[k], v) for k, v in hf.cls.state_dict().items())
    # the decoder is tied to the tower's token embedding, as in the HF model: one tensor
    assert model.mlm_head.predictions.decoder.weight is model.clip.text.transformer.embeddings.word_embeddings.weight
    ids, masked, labels = _masked(tok, model, ["a red square on the photo", "the small blue star"])
    with torch.no_grad():
        logits, targets = model.mlm_logits(masked, labels)
        theirs = hf(input_ids=masked, attention_mask=(masked != tok.pad_token_id).long()).logits
    chosen = labels != IGNORE_INDEX
    assert torch.equal(targets, ids[chosen])
    torch.testing.assert_close(logits, theirs[chosen], atol=1e-5, rtol=1e-5)


def test_the_mlm_loss_is_finite_and_its_gradient_reaches_the_tower(towers, offline):
    model, tok = _build("hf-bert-mlm-nano")
    model.train()
    ids, masked, labels = _masked(tok, model, ["a red square", "a green circle on the star", "the photo of a star"])
    out = model(torch.randn(3, 3, 32, 32), ids, masked, labels)
    loss = F.cross_entropy(out["mlm_logits"], out["mlm_targets"])
    assert torch.isfinite(loss)
    loss.backward()
    transformer = model.clip.text.transformer
    for name in ("embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.query.weight",
                 "encoder.layer.1.output.dense.weight"):
        grad = transformer.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert model.mlm_head.predictions.transform.dense.weight.grad.abs().sum() > 0


def test_a_bare_encoder_gets_a_fresh_head_tied_to_its_embedding(towers, offline):
    model, tok = _build("hf-bert-bare-nano")
    assert isinstance(model.mlm_head, MlmHead) and model.mlm_head.mask_embedding is None
    assert model.mask_id == tok.mask_token_id
    ids, masked, labels = _masked(tok, model, ["a red square", "the small blue star"])
    logits, targets = model.mlm_logits(masked, labels)
    assert logits.shape == (len(targets), len(VOCAB))
    F.cross_entropy(logits, targets).backward()
    assert model.clip.text.transformer.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_masking_never_chooses_or_inserts_a_special_token(towers, offline):
    model, tok = _build("hf-bert-mlm-nano")
    special = torch.tensor(tok.special_ids)
    ids = tok(["a red square", "a z7 star", "the photo of a small green circle on the star"])  # 7: [UNK]
    assert (ids == VOCAB.index("[UNK]")).any()
    inserted = set()
    for seed in range(50):
        masked, labels = mask_tokens(ids, **masking_ids(tok, model.mask_id), rate=0.9,
                                     generator=torch.Generator().manual_seed(seed))
        chosen = labels != IGNORE_INDEX
        assert not torch.isin(ids[chosen], special).any()
        assert torch.equal(masked[~chosen], ids[~chosen])
        replaced = masked[chosen & (masked != ids) & (masked != model.mask_id)]
        assert not torch.isin(replaced, special).any()
        inserted |= set(replaced.tolist())
    assert len(inserted) > 10  # random replacements are drawn from the whole rest of the vocabulary


def test_a_few_trainer_steps_with_infonce_and_mlm(towers, tmp_path):
    shards = write_toy_shards(tmp_path / "shards", n=64, per_shard=32)
    cfg = TrainConfig(data=str(tmp_path / "shards"), out=str(tmp_path / "run"), model="hf-bert-mlm-nano",
                      batch_size=16, steps=3, lr=1e-3, warmup=1, workers=0, shuffle_buffer=16, log_every=1,
                      checkpoint_every=3, precision="fp32", tensorboard=False, mlm_weight=0.1,
                      image_ssl="none")  # the text tower's two objectives
    trainer = Trainer(cfg)
    tok = trainer.tokenizer
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    batch = {"text": tok(["a red square", "the small blue star on a photo"])}
    batch["masked_text"], batch["mlm_labels"] = trainer.mask(batch["text"])
    kept = trainer.drop_padding(batch)
    assert kept["masked_text"].shape[1] == 9  # [CLS], seven words, [SEP]: the [PAD] columns go
    assert kept["text"].shape[1] == 16  # a BERT tower's contrastive pass keeps its full context
    summary = trainer.fit()
    rows = _metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r["contrastive_loss"]) and np.isfinite(r["mlm_loss"]) for r in rows)
    after = trainer.model.state_dict()
    assert not torch.equal(after["clip.text.transformer.encoder.layer.0.attention.self.query.weight"],
                           before["clip.text.transformer.encoder.layer.0.attention.self.query.weight"])
    assert not torch.equal(after["mlm_head.predictions.transform.dense.weight"],
                           before["mlm_head.predictions.transform.dense.weight"])
    # the run's checkpoint rebuilds the same model, the head's decoder tied again
    model, _, tokenizer, _ = load_model(summary["checkpoint"])
    assert all(torch.equal(model.state_dict()[k], v.cpu()) for k, v in after.items())
    assert model.mlm_head.predictions.decoder.weight is model.clip.text.transformer.get_input_embeddings().weight
    assert isinstance(tokenizer, HfTokenizer) and len(shards) == 2


def test_stored_ids_of_another_tokenizer_are_not_used(towers):
    tok = factory.get_tokenizer("hf-bert-mlm-nano")
    img = io.BytesIO()
    square_image("red", np.random.default_rng(0)).save(img, "PNG")
    caption = "a red square"
    decoder = SampleDecoder(lambda image: torch.zeros(3, 4, 4), tok)

    def sample(ids: torch.Tensor, made_by: str | None) -> dict:
        buf = io.BytesIO()
        np.save(buf, ids.numpy().astype(np.int32))
        meta = {} if made_by is None else {"tokenizer": made_by}
        return {"__key__": "k", "png": img.getvalue(), "txt": caption.encode(), "tok.npy": buf.getvalue(),
                "json": json.dumps(meta).encode()}

    ours = tok([caption])[0]
    clip_ids = factory.get_tokenizer("ca-nano")([caption], context_length=16)[0]  # open_clip's BPE, same length
    for made_by in ("ca-nano", None):  # named, and a shard from before prep named its tokenizer
        assert torch.equal(decoder(sample(clip_ids, made_by))["text"], ours)
    stored = ours.clone()
    stored[1] = VOCAB.index("star")  # not what the caption says: so it was read, not tokenised again
    assert torch.equal(decoder(sample(stored, "hf-bert-mlm-nano"))["text"], stored)


def test_the_cli_trains_a_config_from_clipalign_model_configs(towers, tmp_path):
    """The way in for the command line: ``$CLIPALIGN_MODEL_CONFIGS`` names the config's folder."""
    write_toy_shards(tmp_path / "shards", n=32, per_shard=32)
    env = {**os.environ, "CLIPALIGN_MODEL_CONFIGS": str(towers["hf-bert-mlm-nano"].parent), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "clipalign", "train", "--data", str(tmp_path / "shards"),
                          "--out", str(tmp_path / "run"), "--model", "hf-bert-mlm-nano", "--steps", "2",
                          "--batch-size", "8", "--warmup", "1", "--workers", "0", "--shuffle-buffer", "8",
                          "--no-tensorboard", "--no-progress", "--precision", "fp32", "--mlm-weight", "0.1"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = _metrics(tmp_path / "run")
    assert rows[-1]["step"] == 2 and np.isfinite(rows[-1]["mlm_loss"])


def test_export_to_hf_clip_names_the_text_tower_it_cannot_express(towers):
    from clipalign.hf_convert import UnsupportedArchitecture, hf_config

    with pytest.raises(UnsupportedArchitecture, match="a Hugging Face text tower .*bert-mlm"):
        hf_config(factory.get_model_config("hf-bert-mlm-nano"))


def test_image_conditioned_and_content_word_mlm_run_on_the_hf_tower(towers, offline):
    from clipalign.masking import stop_token_ids

    torch.manual_seed(0)
    model = factory.create_model("hf-bert-mlm-nano", mlm_condition="image")
    tok = factory.get_tokenizer("hf-bert-mlm-nano")
    stop = stop_token_ids(tok, tok.eot_token_id)
    assert {VOCAB.index(w) for w in ("a", "the", "of", "on", "photo")} <= set(stop.tolist())
    ids = tok(["a red square on the photo", "the small blue star"])
    masked, labels = mask_tokens(ids, **masking_ids(tok, model.mask_id), rate=0.5, stop_ids=stop,
                                 generator=torch.Generator().manual_seed(0))
    assert not torch.isin(ids[labels != IGNORE_INDEX], stop).any()
    out = model(torch.randn(2, 3, 32, 32), ids, masked, labels)
    F.cross_entropy(out["mlm_logits"], out["mlm_targets"]).backward()
    assert model.clip.visual.conv1.weight.grad.abs().sum() > 0  # through the fusion, to the image tower
    assert model.clip.text.transformer.embeddings.word_embeddings.weight.grad.abs().sum() > 0
