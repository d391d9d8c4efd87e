"""Objective assembly: which losses, heads and queues a config gets, and the optimizer's groups."""
import pytest
import torch

from clipalign.factory import create_model, get_tokenizer
from clipalign.loss import ClipLoss, QueueClipLoss, SigLipLoss
from clipalign.objectives import build_objectives, optimizer_groups, param_groups
from clipalign.train_config import TrainConfig


def _build(**kw):
    torch.manual_seed(0)
    cfg = TrainConfig(data="", out="", model="ca-nano", **{"mlm_weight": 0.1, "image_ssl": "none", **kw})
    model = create_model("ca-nano", mlm_head=cfg.mlm_weight > 0)
    return model, build_objectives(cfg, model, get_tokenizer("ca-nano"))


@pytest.mark.parametrize("kw, loss, bias", [({}, ClipLoss, False), ({"loss": "siglip"}, SigLipLoss, True),
                                            ({"queue_size": 16}, QueueClipLoss, False)])
def test_the_contrastive_loss_follows_the_config(kw, loss, bias):
    _, obj = _build(**kw)
    assert type(obj.contrastive) is loss and obj.uses_bias == bias
    assert (obj.queues is not None) == ("queue_size" in kw)
    assert set(obj.stateful()) == ({"queues"} if "queue_size" in kw else set())


def test_mlm_and_simclr_come_with_their_inputs():
    _, plain = _build(mlm_weight=0.0)
    assert plain.mlm is plain.masker is plain.ssl is plain.ssl_head is plain.view_transform is None
    model, obj = _build(image_ssl="simclr")
    ids = get_tokenizer("ca-nano")(["a red square"])
    masked, labels = obj.masker(ids, generator=torch.Generator().manual_seed(0))
    assert masked.shape == labels.shape == ids.shape and (masked == model.mask_id).any()
    assert obj.ssl is not None and set(obj.stateful()) == {"ssl_head"} and callable(obj.view_transform)


def test_no_weight_decay_on_gains_biases_and_temperature():
    model, _ = _build()
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert "clip.logit_scale" in exempt and "clip.ln_final.weight" in exempt and "mlm_head.bias" in exempt
    assert all(p.ndim >= 2 for p in decay["params"]) and no_decay["weight_decay"] == 0.0


def test_simclrs_head_is_optimised_with_the_model():
    model, obj = _build(image_ssl="simclr")
    groups = optimizer_groups(model, obj, 0.1)
    head = {id(p) for p in obj.ssl_head.parameters()}
    assert head <= {id(p) for g in groups for p in g["params"]}
    assert [len(g["params"]) for g in groups] == [len(a["params"]) + len(b["params"]) for a, b in
                                                  zip(param_groups(model, 0.1), param_groups(obj.ssl_head, 0.1))]


def test_the_default_config_trains_simclr_at_half_weight_and_none_turns_it_off():
    model = create_model("ca-nano")
    default = build_objectives(TrainConfig(data="", out="", model="ca-nano"), model, get_tokenizer("ca-nano"))
    assert default.ssl.weight == 0.5 and default.ssl.temperature == 0.1 and set(default.stateful()) == {"ssl_head"}
    assert default.mlm is None and default.mae is None  # contrastive + SimCLR, nothing else
    for off in ("none", None):  # None: what configs said before "none" existed
        plain = build_objectives(TrainConfig(data="", out="", model="ca-nano", image_ssl=off), model,
                                 get_tokenizer("ca-nano"))
        assert plain.ssl is plain.ssl_head is plain.view_transform is None and not plain.stateful()
