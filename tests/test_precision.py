"""``--precision auto``: bf16 only where it runs natively, fp32 where it would be emulated."""
import pytest
import torch

from clipalign import precision
from clipalign.cli.train import build_config


def test_explicit_precisions_are_kept_and_unknown_ones_refused():
    assert precision.resolve_precision("fp32") == "fp32"
    assert precision.resolve_precision("bf16") == "bf16"
    with pytest.raises(ValueError, match="fp16"):
        precision.resolve_precision("fp16")


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_follows_native_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(precision, "native_bf16", lambda device_type="cpu": native)
    assert precision.resolve_precision("auto") == expected


def test_native_bf16_on_this_cpu_means_bf16_matmuls_are_not_emulated():
    # Emulated bf16 runs tens of times slower than fp32 (0.8 against 47 GFLOP/s on an AVX2-only
    # EPYC); native bf16 is at least as fast. Time both on one matmul, best of 3.
    import time

    def best_seconds(dtype):
        a, b = torch.randn(512, 512, dtype=dtype), torch.randn(512, 512, dtype=dtype)
        a @ b
        times = []
        for _ in range(3):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return min(times)

    slowdown = best_seconds(torch.bfloat16) / best_seconds(torch.float32)
    assert precision.native_bf16("cpu") == (slowdown < 4), slowdown


def test_train_cli_resolves_auto_into_the_run_config(tmp_path, monkeypatch):
    from toydata import write_toy_shards

    write_toy_shards(tmp_path / "shards", n=8, per_shard=8)
    monkeypatch.setattr(precision, "native_bf16", lambda device_type="cpu": False)
    _, cfg = build_config(["--data", str(tmp_path / "shards"), "--out", str(tmp_path / "run"), "--model", "ca-nano"])
    assert cfg.precision == "fp32"
    _, cfg = build_config(["--data", str(tmp_path / "shards"), "--out", str(tmp_path / "run"), "--model", "ca-nano",
                           "--precision", "bf16"])
    assert cfg.precision == "bf16"


def test_the_trainer_resolves_the_library_default_and_records_the_concrete_precision(tmp_path, monkeypatch):
    import json

    from toydata import write_toy_shards

    from clipalign.formats.folders import RunFolder
    from clipalign.train import Trainer
    from clipalign.train_config import TrainConfig

    write_toy_shards(tmp_path / "shards", n=16, per_shard=16)
    monkeypatch.setattr(precision, "native_bf16", lambda device_type="cpu": False)
    cfg = TrainConfig(data=str(tmp_path / "shards"), out=str(tmp_path / "run"), model="ca-nano", steps=1,
                      batch_size=8, workers=0, shuffle_buffer=8, tensorboard=False)
    assert cfg.precision == "auto"
    trainer = Trainer(cfg)
    assert trainer.cfg.precision == "fp32"
    trainer.fit()
    assert json.loads(RunFolder(tmp_path / "run").config.read_text())["precision"] == "fp32"
