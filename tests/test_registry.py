"""Every model in the registry, timm-style: each architecture builds (shrunk to test size: the
same tower classes and code paths with fewer, narrower layers), runs forward and backward
with the MLM head without NaN. Configs whose text tower is a Hugging Face model cannot be
built offline (they download their config); they are listed, not silently dropped."""
import copy
import json
import re
from contextlib import contextmanager
from pathlib import Path

import open_clip
import pytest
import timm
import torch

from clipalign.factory import create_model, get_model_config, list_models
from clipalign.loss import ClipLoss, MlmLoss
from clipalign.masking import mask_tokens

NAMES = list_models()
NEEDS_HUB = sorted(n for n in NAMES if "hf_model_name" in get_model_config(n).get("text_cfg", {}))
BUILDABLE = [n for n in NAMES if n not in NEEDS_HUB]

# timm towers: the same model function with depth and width turned down (its kwargs override the defaults).
TIMM_SHRINK = {
    "vit": dict(depth=1, embed_dim=64, num_heads=2),
    "eva": dict(depth=1, embed_dim=64, num_heads=2),
    "eva02": dict(depth=1, embed_dim=64, num_heads=2),
    "convnext": dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64)),
    "swin": dict(depths=(1, 1, 1, 1), embed_dim=8, num_heads=(1, 1, 2, 2)),
    "fastvit": dict(layers=(1, 1, 1, 1), embed_dims=(8, 16, 32, 64)),
}
TAKES_IMG_SIZE = ("vit", "eva", "eva02", "vitamin")
# Parameters the InfoNCE + MLM step below does not reach, by design: CoCa's captioning decoder
# (trained by the captioning loss, --caption-weight, which this step leaves out) and SigLIP
# configs' logit bias (used by --loss siglip only).
UNTRAINED = ("clip.text_decoder.", "clip.logit_bias")


def _vitamin_shrink():
    from timm.models.vitamin import VitCfg, VitConvCfg

    stem = VitCfg(embed_dim=(16, 32, 64), depths=(1, 1, 1), stem_width=16,
                  conv_cfg=VitConvCfg(norm_layer="layernorm2d", norm_eps=1e-6), head_type="1d")
    return dict(depth=1, embed_dim=64, num_heads=2, embed_cfg=stem)


@contextmanager
def _small_timm_models(img_size: int):
    original = timm.create_model

    def create(name, *args, **kwargs):
        family = name.split("_")[0]
        shrink = _vitamin_shrink() if family == "vitamin" else TIMM_SHRINK.get(family)
        if shrink is None:
            raise AssertionError(f"no test-size settings for timm family {family!r} ({name}); add them")
        if "_mci_" in name:  # MobileCLIP's hybrid ViT: its conv stem fixes the width at 768
            shrink = dict(depth=1)
        if family in TAKES_IMG_SIZE:
            shrink = {**shrink, "img_size": img_size}
        return original(name, *args, **{**kwargs, **shrink})

    timm.create_model = create
    try:
        yield
    finally:
        timm.create_model = original


def shrink_config(cfg: dict) -> dict:
    """The same architecture at test size."""
    cfg = copy.deepcopy(cfg)
    cfg["embed_dim"] = 64  # = the timm towers' width, for configs that use their features unprojected
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    if "timm_model_name" not in v:
        if isinstance(v.get("layers"), (list, tuple)):  # ModifiedResNet
            v.update(layers=[1, 1, 1, 1], width=16, image_size=64)
        else:  # open_clip's VisionTransformer
            patch = v.get("patch_size", 16)
            v.update(layers=1, width=64, head_width=32, image_size=2 * patch)
    else:
        name = v["timm_model_name"]
        patch = re.search(r"patch(\d+)", name)
        v["image_size"] = 224 if name.startswith("swin") else 2 * int(patch.group(1)) if patch else 64
        if "_mci_" in name and not v.get("timm_proj"):
            cfg["embed_dim"] = 768
    t.update(layers=1, width=64, heads=2, context_length=min(16, t.get("context_length", 77)))
    # a Hugging Face tokenizer would be downloaded; the test feeds token ids directly
    for key in ("hf_tokenizer_name", "tokenizer_kwargs"):
        t.pop(key, None)
    if "multimodal_cfg" in cfg:  # CoCa's text decoder
        cfg["multimodal_cfg"].update(layers=1, width=64, heads=2, context_length=t["context_length"])
    return cfg


def test_the_registry_holds_our_configs_and_every_open_clip_architecture():
    assert {"ca-nano", "ca-tiny", "ca-small"} <= set(NAMES)
    builtin = {p.stem for p in (Path(open_clip.__file__).parent / "model_configs").glob("*.json")}
    assert builtin <= set(NAMES) and len(BUILDABLE) > 100


@pytest.mark.parametrize("name", BUILDABLE)
def test_every_model_builds_and_trains_a_step_with_the_mlm_head(name, tmp_path):
    cfg = shrink_config(get_model_config(name))
    size = cfg["vision_cfg"]["image_size"]
    size = size if isinstance(size, int) else size[0]
    # a neutral name: open_clip picks some tokenizers by name (e.g. "siglip"), which would download
    small = f"shrunk-{BUILDABLE.index(name)}"
    (tmp_path / f"{small}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / f"{small}.json")
    torch.manual_seed(0)
    with _small_timm_models(size):
        model = create_model(small)
    model.train()
    images = torch.randn(4, 3, size, size)
    vocab, length = model.vocab_size, cfg["text_cfg"]["context_length"]
    eot = model.eot_id if model.eot_id < vocab else vocab - 1
    texts = torch.randint(1, min(eot, vocab - 1), (4, length))
    texts[:, 0], texts[:, length // 2] = min(eot - 1, vocab - 2), eot  # a start token, then end-of-text
    texts[:, length // 2 + 1 :] = 0
    masked, labels = mask_tokens(texts, mask_id=model.mask_id, eot_id=eot, random_high=max(2, eot - 1),
                                 generator=torch.Generator().manual_seed(0))
    out = model(images, texts, masked, labels)
    assert out["image_features"].shape == out["text_features"].shape == (4, cfg["embed_dim"])
    losses = {**ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"]),
              **MlmLoss()(out["mlm_logits"], out["mlm_targets"])}
    total = sum(losses.values())
    assert torch.isfinite(total), losses
    total.backward()
    without = [n for n, p in model.named_parameters()
               if p.requires_grad and p.grad is None and not n.startswith(UNTRAINED)]
    assert not without, f"trainable parameters the losses never reach: {without[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_configs_with_a_hub_text_tower_are_the_only_ones_not_built_offline():
    assert len(NEEDS_HUB) < 0.1 * len(NAMES)
