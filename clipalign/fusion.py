"""Image-conditioned masked-token prediction: the masked caption is predicted with the image in view.

A text-only masked-token task can guess "a [MASK] circle" from language alone. Here the
masked caption's token states cross-attend to the image tower's tokens (a ViT's patch tokens,
a ResNet's final feature-map positions, or at least the pooled embedding) through a light
fusion block before the MLM head, as ALBEF, BLIP and FLAVA do. The fusion is a training-only
head: the dual encoder used for retrieval stays open_clip's, and export drops it.
"""
from __future__ import annotations

import torch
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer
from torch import nn


class FusionBlock(nn.Module):
    """Pre-norm block: text queries cross-attend to image tokens, then an MLP.

    Args:
        width: text width W (the image tokens are projected to it first).
        heads: attention heads.

    Shape:
        text: (B, L, W); image: (B, N, W) → (B, L, W).
    """

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.ln_text = nn.LayerNorm(width)
        self.ln_image = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        kv = self.ln_image(image)
        text = text + self.attn(self.ln_text(text), kv, kv, need_weights=False)[0]
        return text + self.mlp(self.ln_mlp(text))


class ImageFusion(nn.Module):
    """Project image tokens to the text width, then ``layers`` fusion blocks.

    Args:
        text_width: W of the text tower's token states.
        image_width: C of the image tokens ``image_tokens`` returns.
        layers: fusion blocks (1–2 is light: a fraction of one text-tower layer each).
        heads: attention heads (must divide ``text_width``).

    Shape:
        text: (B, L, W) token states of the masked caption; image: (B, N, C) → (B, L, W).
    """

    def __init__(self, text_width: int, image_width: int, layers: int = 1, heads: int = 2):
        super().__init__()
        self.image_proj = nn.Linear(image_width, text_width)
        self.blocks = nn.ModuleList(FusionBlock(text_width, heads) for _ in range(layers))

    def forward(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        image = self.image_proj(image.to(self.image_proj.weight.dtype))
        for block in self.blocks:
            text = block(text, image)
        return text


def image_token_width(visual: nn.Module, embed_dim: int) -> int:
    """C of the tokens ``image_features_and_tokens`` gives for this tower."""
    if isinstance(visual, VisionTransformer):
        return visual.conv1.out_channels
    if isinstance(visual, ModifiedResNet):
        return visual.attnpool.k_proj.in_features
    return embed_dim  # other towers: the pooled embedding, as one token


def image_features_and_tokens(visual: nn.Module, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of the image tower giving both what ``encode_image`` gives and its tokens.

    Returns:
        ``(features (B, D) unnormalised, tokens (B, N, C))``: a ViT's patch tokens (after its
        final norm; only the kept ones under patch dropout), a ResNet's final feature map as
        H·W positions, or for other towers the pooled features as a single token.
    """
    if isinstance(visual, VisionTransformer):
        # open_clip's own forward, asked for its tokens as well
        keep, visual.output_tokens = visual.output_tokens, True
        try:
            features, tokens = visual(image)
        finally:
            visual.output_tokens = keep
        return features, tokens
    if isinstance(visual, ModifiedResNet):
        out = visual.forward_intermediates(image, indices=1)
        fmap = out["image_intermediates"][-1]  # (B, C, H, W)
        return out["image_features"], fmap.flatten(2).transpose(1, 2)
    features = visual(image)
    return features, features[:, None]
