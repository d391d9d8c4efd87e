"""``TrainConfig``: its checks, ``resolved()``, and the ``clipalign train`` flags generated from it."""
import dataclasses

import pytest
from toydata import write_toy_shards

from clipalign import precision
from clipalign.cli import main
from clipalign.cli.train import build_config, build_parser, config_from_args
from clipalign.train_config import TrainConfig, flag

# a value unlike the default for every field, as typed on the command line and as it arrives
NON_DEFAULT = {
    "data": (["SHARDS"], "SHARDS"), "out": (["RUN"], "RUN"), "model": (["ca-nano"], "ca-nano"),
    "pretrained": (["w.pt"], "w.pt"), "lock_image": ([], True), "lock_text": ([], True),
    "patch_dropout": (["0.5"], 0.5), "grad_checkpointing": ([], True), "loss": (["siglip"], "siglip"),
    "steps": (["7"], 7), "batch_size": (["8"], 8), "lr": (["0.01"], 0.01), "weight_decay": (["0.2"], 0.2),
    "betas": (["0.8", "0.9"], (0.8, 0.9)), "eps": (["1e-8"], 1e-8), "warmup": (["3"], 3),
    "grad_clip": (["0"], 0.0), "precision": (["fp32"], "fp32"), "attention": (["auto"], "auto"),
    "workers": (["0"], 0), "shuffle_buffer": (["16"], 16), "accum_steps": (["2"], 2), "mlm_weight": (["0.1"], 0.1),
    "mlm_rate": (["0.3"], 0.3), "mlm_fraction": (["0.5"], 0.5), "mlm_condition": (["image"], "image"),
    "fusion_layers": (["2"], 2), "mlm_target": (["content"], "content"), "caption_weight": (["0.5"], 0.5),
    "image_ssl": (["none"], "none"),
    "image_ssl_weight": (["1.0"], 1.0), "ssl_temperature": (["0.2"], 0.2), "queue_size": (["64"], 64),
    "momentum": (["0.9"], 0.9), "eval_sets": (["a,b"], ("a", "b")), "eval_every": (["5"], 5),
    "tensorboard": ([], False), "seed": (["3"], 3), "log_every": (["2"], 2), "checkpoint_every": (["4"], 4),
    "keep_checkpoints": (["0"], 0), "max_nonfinite_steps": (["1"], 1), "resume": ([], True),
}


def _option(name):
    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    return f"--no-{name.replace('_', '-')}" if field.default is True else flag(name)


def test_every_field_has_a_flag_whose_default_is_the_configs():
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    options = {s for action in build_parser()._actions for s in action.option_strings}
    assert {_option(n) for n in names} <= options
    args = build_parser().parse_args(["--data", "SHARDS", "--out", "RUN"])
    assert config_from_args(args) == TrainConfig(data="SHARDS", out="RUN")
    assert TrainConfig(data="", out="").precision == "auto"  # both sides: bf16 only where it is native


def test_every_flag_reaches_its_field():
    assert set(NON_DEFAULT) == {f.name for f in dataclasses.fields(TrainConfig)}, "give each new field a value here"
    argv = [s for name, (values, _) in NON_DEFAULT.items() for s in (_option(name), *values)]
    cfg = config_from_args(build_parser().parse_args(argv))
    assert dataclasses.asdict(cfg) == {name: value for name, (_, value) in NON_DEFAULT.items()}
    defaults = TrainConfig(data="SHARDS", out="RUN")
    assert all(getattr(cfg, n) != getattr(defaults, n) for n in NON_DEFAULT if n not in ("data", "out"))


def test_simclr_is_the_default_and_image_ssl_none_turns_it_off():
    defaults = TrainConfig(data="SHARDS", out="RUN")
    assert (defaults.image_ssl, defaults.image_ssl_weight, defaults.mlm_weight) == ("simclr", 0.5, 0.0)
    off = config_from_args(build_parser().parse_args(["--data", "SHARDS", "--out", "RUN", "--image-ssl", "none"]))
    assert off == dataclasses.replace(defaults, image_ssl="none")
    off.validate(paths=False)
    # None, what a config said before "none" existed (an older run's saved config), means "none"
    older = TrainConfig(data="SHARDS", out="RUN", image_ssl=None)
    assert older == off and dataclasses.asdict(older)["image_ssl"] == "none"
    older.validate(paths=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    write_toy_shards(folder, n=8, per_shard=8)
    return str(folder)


@pytest.mark.parametrize("bad, message", [
    (dict(model="ca-huge"), "unknown model 'ca-huge'; known: "),
    (dict(data="/nowhere"), "no shards found at /nowhere"),
    (dict(patch_dropout=1.0), r"--patch-dropout must be in \[0, 1\)"),
    (dict(steps=0), "--steps must be positive"),
    (dict(batch_size=-1), "--batch-size must be positive"),
    (dict(log_every=0), "--log-every must be positive"),
    (dict(checkpoint_every=0), "--checkpoint-every must be positive"),
    (dict(max_nonfinite_steps=0), "--max-nonfinite-steps must be positive"),
    (dict(eval_sets=("/nowhere",)), r"--eval-sets: /nowhere is not a wds/ evaluation set \(no test/nshards.txt\)"),
    (dict(loss="infonce"), r"unknown loss 'infonce' \(one of clip, siglip\)"),
    (dict(precision="fp16"), r"unknown precision 'fp16' \(one of auto, fp32, bf16\)"),
    (dict(attention="flash"), r"unknown attention backend 'flash' \(one of math, auto\)"),
    (dict(image_ssl="mim"), r"unknown image objective 'mim' \(one of none, simclr, mae\)"),
    (dict(accum_steps=3, batch_size=8), "--accum-steps must divide --batch-size"),
    (dict(mlm_fraction=0.0), "--mlm-fraction"),
    (dict(queue_size=8, loss="siglip"), "--queue-size works with --loss clip"),
    (dict(momentum=1.0), "--momentum in"),
    (dict(eval_every=5), "--eval-every needs --eval-sets"),
])
def test_bad_settings_are_refused_naming_the_setting(data, bad, message):
    cfg = TrainConfig(**{"data": data, "out": "RUN", **bad})
    with pytest.raises(ValueError, match=message):
        cfg.validate()


def test_paths_are_checked_only_when_asked(data):
    TrainConfig(data="/nowhere", out="RUN", eval_sets=("/nowhere",)).validate(paths=False)
    TrainConfig(data=data, out="RUN").validate()


def test_the_cli_reports_a_bad_setting_in_one_line(data, tmp_path, capsys):
    argv = ["train", "--data", data, "--out", str(tmp_path / "run"), "--model", "ca-nano"]
    assert main(argv + ["--patch-dropout", "1.5"]) == 2
    assert capsys.readouterr().err == "clipalign train: error: --patch-dropout must be in [0, 1)\n"
    assert main(argv + ["--eval-sets", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "is not a wds/ evaluation set (no test/nshards.txt)" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_resolved_makes_auto_concrete(monkeypatch, native, expected):
    monkeypatch.setattr(precision, "native_bf16", lambda device_type="cpu": native)
    cfg = TrainConfig(data="", out="")
    assert cfg.resolved() == dataclasses.replace(cfg, precision=expected)
    fixed = TrainConfig(data="", out="", precision="bf16")
    assert fixed.resolved() is fixed


def test_build_config_returns_the_checked_resolved_config(data, monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda device_type="cpu": False)
    args, cfg = build_config(["--data", data, "--out", "RUN", "--eval-sets", "", "--betas", "0.5", "0.6"])
    assert args.precision == "auto" and cfg.precision == "fp32" and cfg.betas == (0.5, 0.6) and cfg.eval_sets == ()
