import json

import pytest
import torch
from toydata import truncate_mid_member, write_toy_shards

from clipalign import checkpoint as ckpt
from clipalign.data import DataStreamError
from clipalign.formats.folders import RunFolder
from clipalign.resume import ResumeMismatchError
from clipalign.run_folder import RunLockedError, lock_run
from clipalign.schedule import warmup_cosine
from clipalign.train import NonFiniteLossError, Trainer
from clipalign.train_config import TrainConfig


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_toy_shards(tmp_path_factory.mktemp("shards"), n=256, per_shard=64)


def _cfg(shards, out, **kw):
    # These tests exercise the MLM path (off by default), on batches without SimCLR's views: the
    # default image objective is off here, where it would only slow them (it has its own tests).
    base = dict(data=shards[0].rsplit("/", 1)[0], out=str(out), model="ca-nano", batch_size=32, lr=2e-3,
                warmup=5, workers=0, shuffle_buffer=64, log_every=1, checkpoint_every=10, precision="fp32",
                mlm_weight=0.1, image_ssl="none")
    return TrainConfig(**{**base, **kw})


def _metrics(out):
    return [json.loads(line) for line in RunFolder(out).metrics.read_text().splitlines()]


def test_schedule_warms_up_then_decays_to_zero():
    values = [warmup_cosine(s, 10, 100) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == 1.0
    assert all(a >= b for a, b in zip(values[9:], values[10:])) and values[-1] < 0.01


def test_tiny_run_learns(shards, tmp_path):
    summary = Trainer(_cfg(shards, tmp_path, steps=40)).fit()
    rows = _metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 41))
    first = sum(r["contrastive_loss"] for r in rows[:5]) / 5
    last = sum(r["contrastive_loss"] for r in rows[-5:]) / 5
    assert last < 0.8 * first
    assert sum(r["mlm_loss"] for r in rows[-5:]) < sum(r["mlm_loss"] for r in rows[:5])
    assert {"temperature", "mlm_acc", "samples_per_s", "lr"} <= rows[-1].keys()
    assert summary["steps"] == 40 and summary["checkpoint"].endswith("step_00000040.pt")
    assert json.loads(RunFolder(tmp_path).summary.read_text()) == summary


def test_the_wait_for_each_batch_is_measured(shards, tmp_path, monkeypatch):
    """A loader whose every batch takes 1000 s (of a clock that only the loader moves) shows as
    1000 s of wait a step, and as nearly all of the run's time."""
    import time

    import clipalign.train as train

    offset, real_clock, real_loader = [0.0], time.perf_counter, train.train_loader

    def slow_loader(*args, **kwargs):
        for batch in real_loader(*args, **kwargs):
            offset[0] += 1000.0
            yield batch

    monkeypatch.setattr(train.time, "perf_counter", lambda: real_clock() + offset[0])
    monkeypatch.setattr(train, "train_loader", slow_loader)
    summary = Trainer(_cfg(shards, tmp_path, steps=3, log_every=1)).fit()
    waits = [r["data_wait_s"] for r in _metrics(tmp_path)]
    assert len(waits) == 3 and all(1000 <= w < 1060 for w in waits)  # the real step took under a minute
    assert 3000 / (3000 + 180) < summary["data_wait_frac"] <= 1


def test_mlm_weight_zero_turns_the_head_off(shards, tmp_path):
    trainer = Trainer(_cfg(shards, tmp_path, steps=2, mlm_weight=0.0))
    trainer.fit()
    assert trainer.model.mlm_head is None
    assert "mlm_loss" not in _metrics(tmp_path)[-1]


def test_resume_continues_at_the_same_step_with_the_same_state(shards, tmp_path):
    Trainer(_cfg(shards, tmp_path, steps=20, keep_checkpoints=0)).fit()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000010.pt", "step_00000020.pt"]
    assert not list(RunFolder(tmp_path).checkpoints.glob("*.tmp"))
    saved = ckpt.load_checkpoint(tmp_path)

    resumed = Trainer(_cfg(shards, tmp_path, steps=30, resume=True))
    resumed.load_state_dict(ckpt.load_checkpoint(tmp_path))
    assert resumed.step == 20 and resumed.scheduler.last_epoch == 20
    for name, tensor in saved["model"].items():
        assert torch.equal(resumed.model.state_dict()[name], tensor), name
    opt_saved, opt_now = saved["optimizer"]["state"], resumed.optimizer.state_dict()["state"]
    assert opt_saved.keys() == opt_now.keys()
    assert all(torch.equal(opt_saved[k]["exp_avg"], opt_now[k]["exp_avg"]) for k in opt_saved)

    summary = Trainer(_cfg(shards, tmp_path, steps=30, resume=True)).fit()
    assert summary["resumed_from"].endswith("step_00000020.pt") and summary["steps_this_run"] == 10
    assert [r["step"] for r in _metrics(tmp_path)] == list(range(1, 31))


def test_bad_samples_and_truncated_shards_are_skipped_and_counted(tmp_path):
    shards = write_toy_shards(tmp_path / "bad", n=128, per_shard=64, empty_caption_keys=(0, 1, 2))
    truncate_mid_member(shards[1], 30)
    summary = Trainer(_cfg(shards, tmp_path / "run", steps=8, workers=1)).fit()
    assert summary["steps"] == 8
    assert summary["skipped"].get("empty_caption", 0) >= 3
    assert summary["skipped"].get("truncated_shard", 0) >= 1
    assert _metrics(tmp_path / "run")[-1]["skipped"] == summary["skipped"]


def test_nonfinite_loss_skips_the_update(shards, tmp_path):
    trainer = Trainer(_cfg(shards, tmp_path, steps=1))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    images = torch.full((4, 3, 32, 32), float("nan"))
    texts = trainer.tokenizer(["a red square"] * 4)
    trainer.train_step({"image": images, "text": texts})
    assert trainer.nonfinite_steps == 1 and trainer.step == 1
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    trainer.train_step({"image": torch.randn(4, 3, 32, 32), "text": texts})  # a good step resets the run of bad ones
    assert trainer.nonfinite_in_a_row == 0 and trainer.nonfinite_steps == 1


def test_nonfinite_losses_in_a_row_stop_the_run(shards, tmp_path):
    trainer = Trainer(_cfg(shards, tmp_path, steps=10, max_nonfinite_steps=3))
    images = torch.full((4, 3, 32, 32), float("nan"))
    texts = trainer.tokenizer(["a red square"] * 4)
    trainer.train_step({"image": images, "text": texts})
    trainer.train_step({"image": images, "text": texts})
    with pytest.raises(NonFiniteLossError, match="3 steps in a row"):
        trainer.train_step({"image": images, "text": texts})


def test_a_run_folder_takes_one_trainer_at_a_time(shards, tmp_path):
    with lock_run(tmp_path):
        with pytest.raises(RunLockedError):
            Trainer(_cfg(shards, tmp_path, steps=1)).fit()
    Trainer(_cfg(shards, tmp_path, steps=1)).fit()  # free again once the holder lets go


@pytest.mark.parametrize("content", [b"", b"\x00" * 3000, b"garbage" * 500])
def test_shards_with_no_usable_sample_fail_clearly_instead_of_hanging(tmp_path, content):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "00000.tar").write_bytes(content)
    with pytest.raises(DataStreamError, match="shards read held no sample|unusable"):
        Trainer(_cfg([str(tmp_path / "data" / "00000.tar")], tmp_path / "run", steps=2)).fit()


def test_samples_that_are_all_bad_fail_clearly(tmp_path):
    shards = write_toy_shards(tmp_path / "data", n=64, per_shard=64, empty_caption_keys=tuple(range(64)))
    with pytest.raises(DataStreamError, match="unusable"):
        Trainer(_cfg(shards, tmp_path / "run", steps=2, shuffle_buffer=16)).fit()


def test_resume_after_a_kill_between_checkpoints_logs_each_step_once(shards, tmp_path):
    Trainer(_cfg(shards, tmp_path, steps=25, keep_checkpoints=0)).fit()
    ckpt.checkpoint_path(tmp_path, 25).unlink()  # as if killed at step 25, after the step-20 checkpoint
    assert [r["step"] for r in _metrics(tmp_path)][-1] == 25
    summary = Trainer(_cfg(shards, tmp_path, steps=30, resume=True)).fit()
    assert summary["resumed_from"].endswith("step_00000020.pt")
    assert [r["step"] for r in _metrics(tmp_path)] == list(range(1, 31))


def test_resume_refuses_a_structurally_different_model(shards, tmp_path):
    Trainer(_cfg(shards, tmp_path, steps=2)).fit()
    with pytest.raises(ResumeMismatchError, match="MLM head"):
        Trainer(_cfg(shards, tmp_path, steps=4, resume=True, mlm_weight=0.0)).fit()


def test_a_run_from_before_simclr_was_the_default_resumes_with_image_ssl_none(shards, tmp_path):
    Trainer(_cfg(shards, tmp_path, steps=2, checkpoint_every=2)).fit()
    path = ckpt.latest_checkpoint(tmp_path)
    state = ckpt.load_checkpoint(path)
    state["config"].update(image_ssl=None, image_ssl_weight=1.0)  # as a run of an earlier version saved it
    ckpt.save_checkpoint(path, state)
    # today's default adds SimCLR's head, which that run never had: refused in one line naming the flag
    with pytest.raises(ResumeMismatchError, match="trained without --image-ssl simclr"):
        Trainer(_cfg(shards, tmp_path, steps=4, resume=True, image_ssl="simclr", image_ssl_weight=0.5)).fit()
    summary = Trainer(_cfg(shards, tmp_path, steps=4, resume=True, image_ssl=None)).fit()  # None: "none"
    assert summary["resumed_from"] == str(path) and summary["steps_this_run"] == 2
    assert [r["step"] for r in _metrics(tmp_path)] == [1, 2, 3, 4]
    assert json.loads(RunFolder(tmp_path).config.read_text())["image_ssl"] == "none"


def _one_step(trainer, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(8, 3, 32, 32, generator=g)
    texts = trainer.tokenizer([f"a {c} square" for c in ["red", "green", "blue", "yellow"] * 2])
    return trainer.train_step({"image": images, "text": texts})


@pytest.mark.parametrize("locked, free", [("lock_image", "text"), ("lock_text", "visual")])
def test_a_locked_tower_does_not_move(shards, tmp_path, locked, free):
    trainer = Trainer(_cfg(shards, tmp_path, steps=1, **{locked: True}))
    before = {k: v.clone() for k, v in trainer.model.clip.state_dict().items()}
    _one_step(trainer)
    after = trainer.model.clip.state_dict()
    frozen = "visual." if locked == "lock_image" else "token_embedding"
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(frozen))
    moved = "visual." if free == "visual" else "transformer."
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(moved))


def test_grad_checkpointing_gives_the_same_step(shards, tmp_path):
    torch.manual_seed(0)
    plain = Trainer(_cfg(shards, tmp_path / "a", steps=1))
    torch.manual_seed(0)
    checkpointed = Trainer(_cfg(shards, tmp_path / "b", steps=1, grad_checkpointing=True))
    assert checkpointed.model.clip.transformer.grad_checkpointing
    assert _one_step(plain)["loss"] == pytest.approx(_one_step(checkpointed)["loss"], rel=1e-6)
    for (name, a), b in zip(plain.model.named_parameters(), checkpointed.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


@pytest.mark.parametrize("extra", [{}, {"accum_steps": 2}, {"queue_size": 16}])
def test_dropping_common_padding_gives_the_same_step(shards, tmp_path, extra):
    """The trainer cuts the batch's all-padding token columns; the step must not change."""
    torch.manual_seed(0)
    full = Trainer(_cfg(shards, tmp_path / "a", steps=1, **extra))
    full.drop_padding = lambda batch: batch  # the plain reference: every context column
    torch.manual_seed(0)
    cut = Trainer(_cfg(shards, tmp_path / "b", steps=1, **extra))
    ref, got = _one_step(full), _one_step(cut)
    texts = cut.tokenizer(["a red square"])
    assert cut.drop_padding({"text": texts})["text"].shape[1] < texts.shape[1]  # it does cut
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5) and got["mlm_loss"] == pytest.approx(ref["mlm_loss"], rel=1e-5)
    for (name, a), b in zip(full.model.named_parameters(), cut.model.parameters()):  # (Adam's first step is sign(grad))
        torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("extra", [{}, {"accum_steps": 2}])
def test_padding_the_mlm_rows_gives_the_same_step(shards, tmp_path, monkeypatch, extra):
    """The MLM pass pads its logits' rows (MLM_ROW_MULTIPLE); loss, accuracy and gradients must not change."""
    import clipalign.objectives as objectives_module

    def run(multiple, out):
        monkeypatch.setattr(objectives_module, "MLM_ROW_MULTIPLE", multiple)
        # every real target a hit: the accuracy is then 1 exactly when padding is left out of its count
        monkeypatch.setattr(objectives_module, "mlm_hits", lambda logits, targets: int((targets >= 0).sum()))
        torch.manual_seed(0)
        trainer = Trainer(_cfg(shards, out, steps=1, **extra))
        rows, plain = [], trainer.model.mlm_logits

        def spy(*args, **kwargs):
            logits, targets = plain(*args, **kwargs)
            rows.append(len(targets))
            return logits, targets

        trainer.model.mlm_logits = spy
        return trainer, _one_step(trainer), rows

    ref_trainer, ref, ref_rows = run(1, tmp_path / "a")
    trainer, got, rows = run(64, tmp_path / "b")
    assert all(r % 64 for r in ref_rows) and rows == [64] * len(ref_rows)  # it does pad
    assert got["mlm_acc"] == ref["mlm_acc"] == 1.0
    for key in ("loss", "mlm_loss", "contrastive_loss"):
        assert got[key] == pytest.approx(ref[key], rel=1e-6), key
    for (name, a), b in zip(ref_trainer.model.named_parameters(), trainer.model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-7, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_patch_dropout_reaches_the_vision_tower(shards, tmp_path):
    trainer = Trainer(_cfg(shards, tmp_path, steps=1, patch_dropout=0.5))
    visual = trainer.model.clip.visual
    assert visual.patch_dropout.prob == 0.5
    tokens = []  # the sequence length each pass hands the tower's transformer, (b, tokens, width)
    hook = visual.transformer.register_forward_pre_hook(lambda _, args: tokens.append(args[0].shape[1]))
    try:
        _one_step(trainer)
    finally:
        hook.remove()
    patches = visual.grid_size[0] * visual.grid_size[1]
    assert tokens == [1 + patches // 2]  # the class token and half the patches, in the one training pass


def test_cli_rerun_of_a_finished_run_says_so(shards, tmp_path, capsys):
    from clipalign.cli import main

    argv = ["train", "--data", shards[0].rsplit("/", 1)[0], "--out", str(tmp_path / "run"), "--model", "ca-nano",
            "--steps", "2", "--batch-size", "16", "--workers", "0", "--no-progress", "--precision", "fp32"]
    assert main(argv) == 0
    assert "trained 2 steps (2 this run)" in capsys.readouterr().err
    assert main(argv + ["--resume"]) == 0
    assert "already at step 2 of 2" in capsys.readouterr().err


def test_siglip_run_learns_and_its_checkpoint_loads(shards, tmp_path):
    summary = Trainer(_cfg(shards, tmp_path, steps=30, loss="siglip", lr=2e-3)).fit()
    rows = _metrics(tmp_path)
    assert sum(r["contrastive_loss"] for r in rows[-5:]) < 0.8 * sum(r["contrastive_loss"] for r in rows[:5])
    model, *_ = ckpt.load_model(tmp_path)
    assert model.clip.logit_bias is not None and summary["steps"] == 30
    with pytest.raises(ResumeMismatchError, match="--loss siglip"):
        Trainer(_cfg(shards, tmp_path, steps=40, resume=True)).fit()


def test_pretrained_open_clip_weights_start_the_run(shards, tmp_path):
    from clipalign.factory import create_model

    torch.manual_seed(5)
    source = create_model("ca-nano", mlm_head=False)
    torch.save(source.clip.state_dict(), tmp_path / "open_clip_weights.pt")  # a plain open_clip state dict
    trainer = Trainer(_cfg(shards, tmp_path / "run", steps=1, pretrained=str(tmp_path / "open_clip_weights.pt")))
    loaded = trainer.model.clip.state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in source.clip.state_dict().items())
    with pytest.raises(FileNotFoundError, match="local file"):
        Trainer(_cfg(shards, tmp_path / "run2", steps=1, pretrained="laion2b_s34b_b79k"))
