"""Masked-image prediction on the visible patches (MAE) that shares the contrastive image pass.

FLIP's patch dropout already shows the ViT only some of an image's patches. Here the dropout
also records which patches it kept, so the contrastive pass's own patch tokens feed a small
decoder that reconstructs the per-patch-normalised pixels of the dropped ones: one encoder
pass serves both losses, and it costs less than a contrastive pass over all patches.
"""
from __future__ import annotations

import torch
from open_clip.transformer import PatchDropout, VisionTransformer
from torch import nn


class RecordingPatchDropout(PatchDropout):
    """open_clip's ``PatchDropout`` (the same draws, so the same patches) that keeps, in
    ``kept``, the (B, K) indices of the patches it let through (``None`` when inactive)."""

    def __init__(self, prob: float):
        super().__init__(prob, exclude_first_token=True)
        self.kept: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.prob == 0.0:
            self.kept = None
            return x
        cls_token, patches = x[:, :1], x[:, 1:]
        batch, tokens = patches.shape[:2]
        keep = max(1, int(tokens * (1 - self.prob)))
        self.kept = torch.randn(batch, tokens).topk(keep, dim=-1).indices.to(x.device)
        return torch.cat((cls_token, patches[torch.arange(batch, device=x.device)[:, None], self.kept]), dim=1)


def install_recording_dropout(visual: nn.Module, prob: float) -> RecordingPatchDropout:
    """Put a ``RecordingPatchDropout`` of ``prob`` into a ViT tower (it has no parameters).

    Raises:
        ValueError: the tower is not open_clip's ``VisionTransformer``, or ``prob`` is 0.
    """
    if not isinstance(visual, VisionTransformer):
        raise ValueError(f"--image-ssl mae needs a ViT image tower; this model's is {type(visual).__name__}")
    if not 0 < prob < 1:
        raise ValueError("--image-ssl mae needs --patch-dropout in (0, 1): the dropped patches are its targets")
    visual.patch_dropout = RecordingPatchDropout(prob)
    return visual.patch_dropout


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, 3, H, W) → (B, N, patch·patch·3) pixels, patches in the ViT's row-major order."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


class MaeDecoder(nn.Module):
    """MAE's light decoder: the kept patch tokens plus a mask token at every dropped position,
    position embeddings, ``layers`` pre-norm transformer blocks, and a per-patch pixel head.

    Args:
        encoder_width: W of the ViT's patch tokens.
        num_patches: N patches of an image.
        patch_pixels: P = patch·patch·3 values predicted per patch.
        width, layers, heads: the decoder's size (MAE's is 512 × 8; this one is for small towers).

    Shape:
        tokens: (B, K, W) kept patch tokens; kept: (B, K) their patch indices → (B, N, P).
    """

    def __init__(self, encoder_width: int, num_patches: int, patch_pixels: int, width: int = 128, layers: int = 2,
                 heads: int = 4):
        super().__init__()
        self.embed = nn.Linear(encoder_width, width)
        self.mask_token = nn.Parameter(torch.zeros(width))
        self.position = nn.Parameter(torch.randn(num_patches, width) * 0.02)
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, patch_pixels)

    def forward(self, tokens: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        b, n = tokens.shape[0], self.position.shape[0]
        x = self.mask_token.to(tokens.dtype).expand(b, n, -1).clone()
        x[torch.arange(b, device=x.device)[:, None], kept] = self.embed(tokens).to(x.dtype)
        return self.head(self.norm(self.blocks(x + self.position.to(x.dtype))))


def mae_decoder_for(visual: VisionTransformer, width: int = 128, layers: int = 2) -> MaeDecoder:
    """A decoder sized for ``visual``'s patches."""
    patch = visual.patch_size[0]
    grid = visual.grid_size[0] * visual.grid_size[1]
    return MaeDecoder(visual.conv1.out_channels, grid, patch * patch * 3, width=width, layers=layers)
