"""open_clip's CLIP ↔ Hugging Face's ``transformers.CLIPModel``: configs and weights.

The weight names map through the tables below, in both directions; only the attention's
fused ``in_proj`` (open_clip) ↔ separate ``q/k/v_proj`` (HF) and the two projections (stored
transposed) need more than a rename. An architecture HF's CLIP cannot express (a ResNet or
timm image tower, a custom or HF text tower, attention pooling, ...) is refused naming what.
"""
from __future__ import annotations

from typing import Any

import torch

# Outside the blocks: open_clip name → HF name (LayerNorms map their .weight and .bias alike).
TOWERS: dict[str, str] = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre": "vision_model.pre_layrnorm",  # sic: HF's spelling
    "visual.ln_post": "vision_model.post_layernorm",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final": "text_model.final_layer_norm",
    "logit_scale": "logit_scale",
}
# Stored as (in, out) in open_clip and as a Linear's (out, in) weight in HF.
PROJECTIONS: dict[str, str] = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
# The blocks of each tower, and the parts of a block.
BLOCKS: dict[str, str] = {"visual.transformer.resblocks": "vision_model.encoder.layers",
                          "transformer.resblocks": "text_model.encoder.layers"}
BLOCK_PARTS: dict[str, str] = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                               "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
QKV = ("q_proj", "k_proj", "v_proj")
EOT_ID = 49407  # open_clip's end-of-text id: HF's text model pools at its first occurrence


class UnsupportedArchitecture(ValueError):
    """The open_clip model has a part HF's ``CLIPModel`` cannot express."""


def _rename(name: str, table: dict[str, str]) -> str | None:
    for src, dst in table.items():
        if name == src or name.startswith(src + "."):
            return dst + name[len(src):]
    return None


def open_clip_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip ``CLIP`` state dict → a ``CLIPModel`` state dict (the tensors are shared where
    they are not split or transposed)."""
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if name in PROJECTIONS:
            out[PROJECTIONS[name]] = value.T.contiguous()
        elif (renamed := _rename(name, TOWERS)) is not None:
            out[renamed] = value
        else:
            tower = next((t for t in BLOCKS if name.startswith(t + ".")), None)
            if tower is None:
                raise UnsupportedArchitecture(f"no Hugging Face CLIP weight for {name!r}")
            index, part = name[len(tower) + 1:].split(".", 1)
            prefix = f"{BLOCKS[tower]}.{index}"
            if part in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = "weight" if part.endswith("weight") else "bias"
                for proj, chunk in zip(QKV, value.chunk(3)):
                    out[f"{prefix}.self_attn.{proj}.{kind}"] = chunk.contiguous()
            elif (renamed := _rename(part, BLOCK_PARTS)) is not None:
                out[f"{prefix}.{renamed}"] = value
            else:
                raise UnsupportedArchitecture(f"no Hugging Face CLIP weight for {name!r}")
    return out


def hf_to_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``CLIPModel`` state dict → an open_clip ``CLIP`` state dict (the inverse of ``open_clip_to_hf``)."""
    towers = {v: k for k, v in TOWERS.items()}
    projections = {v: k for k, v in PROJECTIONS.items()}
    blocks = {v: k for k, v in BLOCKS.items()}
    parts = {v: k for k, v in BLOCK_PARTS.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in state.items():
        if name.endswith("position_ids"):
            continue  # a buffer HF keeps, not a weight
        if name in projections:
            out[projections[name]] = value.T.contiguous()
        elif (renamed := _rename(name, towers)) is not None:
            out[renamed] = value
        else:
            tower = next((t for t in blocks if name.startswith(t + ".")), None)
            if tower is None:
                raise UnsupportedArchitecture(f"no open_clip weight for Hugging Face's {name!r}")
            index, part = name[len(tower) + 1:].split(".", 1)
            prefix = f"{blocks[tower]}.{index}"
            proj = next((p for p in QKV if part.startswith(f"self_attn.{p}.")), None)
            if proj is not None:
                kind = part.rsplit(".", 1)[1]
                qkv.setdefault(f"{prefix}.attn.in_proj_{kind}", {})[proj] = value
            elif (renamed := _rename(part, parts)) is not None:
                out[f"{prefix}.{renamed}"] = value
            else:
                raise UnsupportedArchitecture(f"no open_clip weight for Hugging Face's {name!r}")
    for name, pieces in qkv.items():
        out[name] = torch.cat([pieces[p] for p in QKV])
    return out


def hf_config(cfg: dict[str, Any]) -> Any:
    """An open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``) → ``transformers.CLIPConfig``.

    Raises:
        UnsupportedArchitecture: naming the first setting HF's CLIP has no equivalent for.
    """
    from transformers import CLIPConfig

    vision, text = dict(cfg["vision_cfg"]), dict(cfg["text_cfg"])
    if isinstance(vision.get("layers"), (list, tuple)):
        raise UnsupportedArchitecture("a ResNet image tower (Hugging Face's CLIP has ViT towers only)")
    for name in ("timm_model_name", "attentional_pool", "attn_pooler_queries", "no_ln_pre", "final_ln_after_pool",
                 "pool_type", "output_tokens", "ls_init_value", "patch_dropout", "act_kwargs", "norm_kwargs"):
        if vision.get(name) not in (None, False, 0, 0.0, "tok"):
            raise UnsupportedArchitecture(f"the image tower's {name}={vision[name]!r}")
    if text.get("hf_model_name"):
        raise UnsupportedArchitecture(f"a Hugging Face text tower ({text['hf_model_name']}; "
                                      "Hugging Face's CLIPModel has CLIP's own text transformer only)")
    for name in ("embed_cls", "pad_id", "no_causal_mask", "proj_bias", "pool_type", "ls_init_value",
                 "output_tokens", "act_kwargs", "norm_kwargs", "final_ln_after_pool"):
        if text.get(name) not in (None, False, 0, "argmax"):
            raise UnsupportedArchitecture(f"the text tower's {name}={text[name]!r}")
    if cfg.get("custom_text") or "multimodal_cfg" in cfg:
        raise UnsupportedArchitecture("a custom text tower or a multimodal decoder (CoCa)")
    image_size = vision.get("image_size", 224)
    image_size = image_size if isinstance(image_size, int) else image_size[0]
    patch = vision.get("patch_size", 16)
    patch = patch if isinstance(patch, int) else patch[0]
    act = "quick_gelu" if cfg.get("quick_gelu") else "gelu"
    v_width, t_width = vision.get("width", 768), text.get("width", 512)
    v_heads = vision.get("heads") or v_width // vision.get("head_width", 64)
    return CLIPConfig(
        projection_dim=cfg["embed_dim"],
        text_config=dict(vocab_size=text.get("vocab_size", 49408), hidden_size=t_width,
                         intermediate_size=int(t_width * text.get("mlp_ratio", 4.0)),
                         num_hidden_layers=text.get("layers", 12), num_attention_heads=text.get("heads", 8),
                         max_position_embeddings=text.get("context_length", 77), hidden_act=act,
                         layer_norm_eps=1e-5, bos_token_id=EOT_ID - 1, eos_token_id=EOT_ID, pad_token_id=0),
        vision_config=dict(hidden_size=v_width, intermediate_size=int(v_width * vision.get("mlp_ratio", 4.0)),
                           num_hidden_layers=vision.get("layers", 12), num_attention_heads=v_heads,
                           image_size=image_size, patch_size=patch, hidden_act=act, layer_norm_eps=1e-5),
    )


def open_clip_config(config: Any) -> dict[str, Any]:
    """A ``transformers.CLIPConfig`` → the open_clip model config of the same architecture."""
    text, vision = config.text_config, config.vision_config
    for part, c in (("text", text), ("vision", vision)):
        if c.hidden_act not in ("gelu", "quick_gelu"):
            raise UnsupportedArchitecture(f"the {part} model's activation {c.hidden_act!r}")
    cfg: dict[str, Any] = {
        "embed_dim": config.projection_dim,
        "vision_cfg": {"image_size": vision.image_size, "patch_size": vision.patch_size, "width": vision.hidden_size,
                       "layers": vision.num_hidden_layers, "head_width": vision.hidden_size // vision.num_attention_heads,
                       "mlp_ratio": vision.intermediate_size / vision.hidden_size},
        "text_cfg": {"context_length": text.max_position_embeddings, "vocab_size": text.vocab_size,
                     "width": text.hidden_size, "heads": text.num_attention_heads, "layers": text.num_hidden_layers,
                     "mlp_ratio": text.intermediate_size / text.hidden_size},
    }
    if text.hidden_act == "quick_gelu":
        cfg["quick_gelu"] = True
    return cfg
