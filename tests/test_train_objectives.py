"""The trainer's optional objectives and step mechanics: accumulation, MLM fraction, SimCLR,
the MoCo queue, evaluation during training, TensorBoard and pre-tokenised captions."""
import io
import json

import numpy as np
import pytest
import torch
from toydata import COLOURS, square_image, write_toy_shards

from clipalign import checkpoint as ckpt
from clipalign.data import SampleDecoder, seeded_cpu_rng
from clipalign.formats.folders import RunFolder
from clipalign.momentum import FeatureQueue, MomentumQueues
from clipalign.train import Trainer, split_batch
from clipalign.train_config import TrainConfig
from data_prep.evalsets import write_classification_set


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_toy_shards(tmp_path_factory.mktemp("shards"), n=128, per_shard=64)


def _cfg(shards, out, **kw):
    # The MLM path (off by default) is under test, on batches without SimCLR's views: SimCLR (the
    # default) only where a test asks for it.
    base = dict(data=shards[0].rsplit("/", 1)[0], out=str(out), model="ca-nano", batch_size=16, lr=2e-3,
                warmup=2, workers=0, shuffle_buffer=32, log_every=1, checkpoint_every=100, precision="fp32",
                tensorboard=False, mlm_weight=0.1, image_ssl="none")
    return TrainConfig(**{**base, **kw})


def _batch(trainer, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    colours = list(COLOURS)
    texts = trainer.tokenizer([f"a {colours[i % 4]} square" for i in range(n)])
    masked, labels = trainer.objectives.masker(texts, generator=g)
    return {"image": torch.randn(n, 3, 32, 32, generator=g), "text": texts, "masked_text": masked, "mlm_labels": labels}


def _grads(trainer):
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def test_split_batch_keeps_rows_in_order():
    batch = {"a": torch.arange(8), "b": torch.arange(8) * 10}
    parts = split_batch(batch, 4)
    assert len(parts) == 4 and torch.equal(torch.cat([p["b"] for p in parts]), batch["b"])


@pytest.mark.parametrize("condition", ["none", "image"])
def test_accumulated_step_equals_one_pass_over_the_whole_batch(shards, tmp_path, condition):
    """Feature caching keeps every sample of the batch as a negative: the gradient is the same."""
    results = []
    for accum in (1, 4):
        trainer = Trainer(_cfg(shards, tmp_path / f"a{accum}", accum_steps=accum, grad_clip=0.0, batch_size=8,
                               mlm_condition=condition))
        logs = trainer.train_step(_batch(trainer))
        results.append((logs, _grads(trainer)))
    (logs1, g1), (logs4, g4) = results
    assert logs4["contrastive_loss"] == pytest.approx(logs1["contrastive_loss"], rel=1e-5)
    assert logs4["mlm_loss"] == pytest.approx(logs1["mlm_loss"], rel=1e-5)
    assert g1.keys() == g4.keys()
    for name in g1:
        assert torch.allclose(g1[name], g4[name], rtol=1e-4, atol=1e-6), name


def test_mlm_fraction_runs_the_mlm_pass_on_part_of_the_batch(shards, tmp_path, monkeypatch):
    trainer = Trainer(_cfg(shards, tmp_path, mlm_fraction=0.25))
    rows = []
    original = trainer.model.mlm_logits
    monkeypatch.setattr(trainer.model, "mlm_logits",
                        lambda ids, labels, *tokens, **kw: rows.append(len(ids)) or original(ids, labels, *tokens, **kw))
    logs = trainer.train_step(_batch(trainer, n=8))
    assert rows == [2] and np.isfinite(logs["mlm_loss"])


def test_the_mlm_mean_counts_the_masked_tokens_of_the_rows_it_runs_on():
    from clipalign.masking import IGNORE_INDEX
    from clipalign.objectives import Objectives

    labels = torch.full((4, 5), IGNORE_INDEX)
    labels[0, :1], labels[1, :2], labels[2, :3], labels[3, :4] = 7, 7, 7, 7  # 1, 2, 3, 4 masked tokens a row
    objectives = Objectives(contrastive=torch.nn.Identity(), mlm_fraction=0.5)
    assert objectives.mlm_rows(4) == 2 and objectives.masked_count({"mlm_labels": labels}) == 1 + 2
    assert Objectives(contrastive=torch.nn.Identity()).masked_count({"mlm_labels": labels}) == 10
    assert Objectives(contrastive=torch.nn.Identity(), mlm_fraction=0.1).mlm_rows(4) == 1  # at least one row


def test_feature_queue_is_a_ring_of_the_latest_features():
    q = FeatureQueue(5, 2)
    q.push(torch.tensor([[1.0, 0], [2, 0], [3, 0]]))
    assert q.features()[:, 0].tolist() == [1, 2, 3]
    q.push(torch.tensor([[4.0, 0], [5, 0], [6, 0], [7, 0]]))
    assert sorted(q.features()[:, 0].tolist()) == [3, 4, 5, 6, 7] and int(q.ptr) == 2


def test_momentum_update_is_an_exponential_moving_average(shards, tmp_path):
    trainer = Trainer(_cfg(shards, tmp_path))
    queues = MomentumQueues(trainer.model, size=8, dim=32, momentum=0.9)
    ema_before = {n: p.clone() for n, p in queues.ema.named_parameters()}
    with torch.no_grad():
        for p in trainer.model.clip.parameters():
            p.add_(1.0)
    queues.update(trainer.model)
    online = dict(trainer.model.clip.named_parameters())
    for name, p in queues.ema.named_parameters():
        assert torch.allclose(p, 0.9 * ema_before[name] + 0.1 * online[name]), name


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_queue_run_fills_the_queue_and_resumes_with_it(shards, tmp_path, momentum):
    cfg = _cfg(shards, tmp_path, steps=3, queue_size=40, momentum=momentum, checkpoint_every=3)
    trainer = Trainer(cfg)
    trainer.fit()
    queues = trainer.objectives.queues
    assert int(queues.image_queue.filled) == 40 and int(queues.text_queue.ptr) == 48 % 40
    rows = [json.loads(line) for line in RunFolder(tmp_path).metrics.read_text().splitlines()]
    assert all(np.isfinite(r["contrastive_loss"]) for r in rows)
    state = ckpt.load_checkpoint(tmp_path)
    resumed = Trainer(_cfg(shards, tmp_path, steps=3, queue_size=40, momentum=momentum, resume=True))
    resumed.load_state_dict(state)
    assert torch.equal(resumed.objectives.queues.image_queue.buffer, queues.image_queue.buffer)


def test_simclr_objective_trains_on_two_views(shards, tmp_path):
    trainer = Trainer(_cfg(shards, tmp_path, steps=3, image_ssl="simclr", image_ssl_weight=0.5))
    head_before = {k: v.clone() for k, v in trainer.objectives.ssl_head.state_dict().items()}
    summary = trainer.fit()
    assert np.isfinite(summary["final"]["image_ssl_loss"]) and summary["final"]["image_ssl_loss"] > 0
    assert any(not torch.equal(head_before[k], v) for k, v in trainer.objectives.ssl_head.state_dict().items())
    assert "ssl_head" in ckpt.load_checkpoint(tmp_path)


def test_loader_makes_two_different_views_per_image(shards, tmp_path):
    trainer = Trainer(_cfg(shards, tmp_path, image_ssl="simclr"))
    pipeline = trainer._pipeline(shards)
    batch, _ = next(iter(pipeline))
    assert batch["views"].shape == (16, 2, 3, 32, 32)
    assert not torch.equal(batch["views"][:, 0], batch["views"][:, 1])


def _draws():
    return torch.rand(4), torch.randint(100, (3,)), torch.empty(2).uniform_(0.5, 2.0)


def test_seeded_cpu_rng_draws_what_manual_seed_draws_and_gives_the_rng_back():
    # the loader's per-sample augmentation seed: the same numbers as fork_rng + manual_seed,
    # without manual_seed's per-backend calls
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        reference = _draws()
    torch.manual_seed(5)
    state = torch.get_rng_state()
    with seeded_cpu_rng(1234):
        got = _draws()
    assert all(torch.equal(a, b) for a, b in zip(got, reference))
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(ValueError), seeded_cpu_rng(99):
        torch.rand(1)
        raise ValueError("a bad sample")
    assert torch.equal(torch.get_rng_state(), state)


def test_the_default_objective_is_contrastive_plus_simclr_and_image_ssl_none_turns_it_off(shards, tmp_path):
    from clipalign.cli import main

    argv = ["train", "--data", shards[0].rsplit("/", 1)[0], "--model", "ca-nano", "--steps", "2", "--batch-size", "8",
            "--workers", "0", "--shuffle-buffer", "16", "--precision", "fp32", "--log-every", "1",
            "--no-tensorboard", "--no-progress"]
    runs = {name: RunFolder(tmp_path / name) for name in ("default", "off")}
    assert main([*argv, "--out", str(runs["default"].root)]) == 0
    assert main([*argv, "--out", str(runs["off"].root), "--image-ssl", "none"]) == 0
    rows = {name: [json.loads(line) for line in run.metrics.read_text().splitlines()] for name, run in runs.items()}
    config = {name: json.loads(run.config.read_text()) for name, run in runs.items()}
    assert (config["default"]["image_ssl"], config["default"]["image_ssl_weight"]) == ("simclr", 0.5)
    assert config["off"]["image_ssl"] == "none"
    for r in rows["default"]:  # the SimCLR loss is logged and summed into the loss, beside the contrastive one
        assert r["image_ssl_loss"] > 0 and "mlm_loss" not in r
        assert r["loss"] == pytest.approx(r["contrastive_loss"] + r["image_ssl_loss"], rel=1e-6)
    assert all("image_ssl_loss" not in r and r["loss"] == r["contrastive_loss"] for r in rows["off"])
    assert "ssl_head" in ckpt.load_checkpoint(runs["default"].root)
    assert "ssl_head" not in ckpt.load_checkpoint(runs["off"].root)


def test_the_default_simclr_objective_resumes_step_exact(shards, tmp_path):
    kw = dict(steps=4, batch_size=8, mlm_weight=0.0, image_ssl="simclr", image_ssl_weight=0.5, checkpoint_every=2,
              keep_checkpoints=0)
    whole = Trainer(_cfg(shards, tmp_path / "whole", **kw))
    whole_final = whole.fit()["final"]
    half = ckpt.load_checkpoint(tmp_path / "whole" / "checkpoints" / "step_00000002.pt")
    assert "ssl_head" in half
    ckpt.save_checkpoint(tmp_path / "resumed" / "checkpoints" / "step_00000002.pt", half)
    resumed = Trainer(_cfg(shards, tmp_path / "resumed", resume=True, **kw))
    resumed_final = resumed.fit()["final"]
    # step 4 to the bit: the views are drawn per sample, the head's BatchNorm statistics are in the checkpoint
    for key in ("contrastive_loss", "image_ssl_loss"):
        assert resumed_final[key] == whole_final[key], key
    for mine, theirs in ((resumed.model, whole.model), (resumed.objectives.ssl_head, whole.objectives.ssl_head)):
        for k, v in theirs.state_dict().items():
            assert torch.equal(mine.state_dict()[k], v), k


def test_evaluation_during_training_is_logged_and_sent_to_tensorboard(shards, tmp_path):
    rng = np.random.default_rng(0)
    colours = list(COLOURS)
    evalset = tmp_path / "colours"
    write_classification_set(evalset, [(square_image(colours[i % 4], rng), i % 4) for i in range(16)], colours,
                             ["a {c} square"])
    run = RunFolder(tmp_path / "run")
    trainer = Trainer(_cfg(shards, run.root, steps=4, eval_sets=(str(evalset),), eval_every=2, log_every=3,
                           checkpoint_every=2, keep_checkpoints=0, tensorboard=True))
    trainer.fit()
    lines = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    rows = {r["step"]: r for r in lines}
    evaluated = {step: r["eval/colours/acc1"] for step, r in rows.items() if "eval/colours/acc1" in r}
    assert list(evaluated) == [2, 4] and [r["step"] for r in lines] == [2, 3, 4]
    # the logged scores are those of the model at that step, as clipalign eval scores its checkpoint
    from clipalign.evaluate import evaluate, load_eval_set

    for step in evaluated:
        model, transform, tokenizer, _ = ckpt.load_model(ckpt.checkpoint_path(run.root, step))
        scores = evaluate(model, tokenizer, transform, load_eval_set(evalset), precision="fp32")["metrics"]
        finite = {f"eval/colours/{k}": v for k, v in scores.items() if np.isfinite(v)}
        assert {k: rows[step][k] for k in finite} == finite, step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run.tensorboard))
    events.Reload()
    assert {"train/contrastive_loss", "eval/colours/acc1"} <= set(events.Tags()["scalars"])
    assert {e.step: e.value for e in events.Scalars("eval/colours/acc1")} == pytest.approx(evaluated)


def test_pretokenised_captions_are_used_as_stored(shards, tmp_path):
    trainer = Trainer(_cfg(shards, tmp_path))
    ids = trainer.tokenizer(["a blue square"])[0].numpy().astype(np.int32)
    buf = io.BytesIO()
    np.save(buf, ids)
    img = io.BytesIO()
    square_image("red", np.random.default_rng(0)).save(img, "PNG")
    decoder = SampleDecoder(trainer.train_transform, lambda texts: pytest.fail("tokenised again"))
    decoder.context_length = len(ids)
    sample = {"__key__": "k", "png": img.getvalue(), "txt": b"a blue square", "tok.npy": buf.getvalue()}
    assert torch.equal(decoder(sample)["text"], torch.from_numpy(ids.astype(np.int64)))
    # stored ids of another context length are ignored, the caption is tokenised
    short = io.BytesIO()
    np.save(short, ids[:5])
    decoder = SampleDecoder(trainer.train_transform, trainer.tokenizer)
    out = decoder({**sample, "tok.npy": short.getvalue()})
    assert out["text"].shape == (len(ids),)


def test_bad_settings_are_refused(shards, tmp_path):
    for bad in (dict(accum_steps=3), dict(mlm_fraction=0.0), dict(queue_size=8, loss="siglip"),
                dict(image_ssl="mim"), dict(eval_every=5)):
        with pytest.raises(ValueError):
            _cfg(shards, tmp_path, **bad).validate()


def test_an_image_with_several_captions_trains_on_each_in_turn(shards, tmp_path):
    """``prep --caption-mode all`` writes one caption per line of ``txt`` (and, tokenised, one
    row per caption in ``tok.npy``): each pass over the sample draws one, reproducibly."""
    trainer = Trainer(_cfg(shards, tmp_path))
    captions = ["a red square", "a small red square at the top", "a square, red"]
    ids = trainer.tokenizer(captions).numpy().astype(np.int32)
    img = io.BytesIO()
    square_image("red", np.random.default_rng(0)).save(img, "PNG")
    base = {"__key__": "k", "png": img.getvalue(), "txt": "\n".join(captions).encode() + b"\n\n"}
    stored = io.BytesIO()
    np.save(stored, ids)
    for sample, tokenizer in ((base, trainer.tokenizer),
                              ({**base, "tok.npy": stored.getvalue()}, lambda t: pytest.fail("tokenised again"))):
        decoder = SampleDecoder(trainer.train_transform, tokenizer)
        decoder.context_length = ids.shape[1]
        drawn = [decoder({**sample, "__seed__": seed})["text"] for seed in range(30)]
        rows = {int(np.flatnonzero((ids == d.numpy()).all(1))[0]) for d in drawn}
        assert rows == {0, 1, 2}  # every caption gets its turn, and nothing else is drawn
        assert torch.equal(decoder({**sample, "__seed__": 7})["text"], drawn[7])  # the same seed, the same caption


def test_image_conditioned_content_mlm_resumes_step_exact(shards, tmp_path):
    kw = dict(steps=4, mlm_condition="image", mlm_target="content", checkpoint_every=2, keep_checkpoints=0)
    whole = Trainer(_cfg(shards, tmp_path / "whole", **kw))
    whole.fit()
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    ckpt.save_checkpoint(tmp_path / "resumed" / "checkpoints" / "step_00000002.pt",
                         ckpt.load_checkpoint(tmp_path / "whole" / "checkpoints" / "step_00000002.pt"))
    resumed = Trainer(_cfg(shards, tmp_path / "resumed", resume=True, **kw))
    assert resumed.fit()["steps_this_run"] == 2
    for name, p in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], p), name
    assert any(n.startswith("mlm_fusion.") for n in whole.model.state_dict())
    without = Trainer(_cfg(shards, tmp_path / "resumed", **{**kw, "mlm_condition": "none", "resume": True}))
    with pytest.raises(ValueError, match="--mlm-condition image"):
        without.fit()


def test_a_huge_caption_is_cut_before_it_is_tokenised(shards, tmp_path):
    from clipalign.formats.sample import caption_char_limit

    trainer = Trainer(_cfg(shards, tmp_path))
    seen = []

    def tokenizer(texts):
        seen.extend(texts)
        return trainer.tokenizer(texts)

    img = io.BytesIO()
    square_image("red", np.random.default_rng(0)).save(img, "PNG")
    decoder = SampleDecoder(trainer.train_transform, tokenizer)
    decoder.context_length = trainer.tokenizer.context_length
    huge = "a blue square " + "é" * 5_000_000  # 10 MB of caption
    out = decoder({"__key__": "k", "png": img.getvalue(), "txt": huge.encode()})
    assert len(seen[0].replace(" ", "")) == caption_char_limit(decoder.context_length) and huge.startswith(seen[0])
    assert torch.equal(out["text"], trainer.tokenizer([huge[:100_000]])[0])  # what the tokenizer kept anyway
