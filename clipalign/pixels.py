"""Training images travel from the loader's workers as uint8 and are normalised a batch at a time.

An image transform from open_clip (or SimCLR's views) ends with ``ToTensor`` and ``Normalize``:
two passes over every image in the worker, and a float batch four times the bytes to hand to
the trainer. ``uint8_transform`` splits such a transform: the worker stops at a (3, H, W) uint8
tensor, and the trainer applies ``BatchNormalize`` to the whole batch, which does the same float
operations in the same order, so the images it gives are bit for bit the transform's own.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from open_clip.transform import MaybeToTensor
from torchvision import transforms as T
from torchvision.transforms import functional as F


class BatchNormalize:
    """uint8 images (..., C, H, W) → float32 ``(x / 255 - mean) / std``, as ``ToTensor`` then
    ``Normalize`` do one image at a time."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32)  # a new tensor: the rest runs in place on it
        return x.div_(255).sub_(self.mean.to(x.device)).div_(self.std.to(x.device))


def _pil_to_uint8(image) -> torch.Tensor:
    """A PIL image → (C, H, W) uint8, contiguous (what ``ToTensor`` makes, before its ``/ 255``)."""
    return F.pil_to_tensor(image).contiguous()


def uint8_transform(transform: Callable) -> tuple[Callable, BatchNormalize | None]:
    """Split ``transform`` into (PIL → uint8 tensor, ``BatchNormalize``).

    Only a ``Compose`` that ends with ``ToTensor`` (or open_clip's ``MaybeToTensor``) and a
    ``Normalize`` in place is split; any other transform comes back as it is, with ``None``.
    """
    if not isinstance(transform, T.Compose) or len(transform.transforms) < 2:
        return transform, None
    steps = transform.transforms
    to_tensor, normalize = steps[-2], steps[-1]
    if not isinstance(to_tensor, (T.ToTensor, MaybeToTensor)) or type(normalize) is not T.Normalize:
        return transform, None
    return T.Compose([*steps[:-2], _pil_to_uint8]), BatchNormalize(normalize.mean, normalize.std)


def normalize_batch(batch: dict[str, torch.Tensor], normalizers: dict[str, BatchNormalize]) -> dict[str, torch.Tensor]:
    """``batch`` with each uint8 entry that has a normaliser (``image``, ``views``) normalised;
    float entries (a batch made elsewhere, already normalised) are left as they are."""
    return {k: normalizers[k](v) if k in normalizers and v.dtype == torch.uint8 else v for k, v in batch.items()}


def loader_transforms(transform: Callable, view_transform: Callable | None
                      ) -> tuple[Callable, Callable | None, dict[str, BatchNormalize]]:
    """The loader's image and view transforms, each split where it can be (``uint8_transform``),
    and the normalisers the trainer applies to those entries of a batch."""
    image, image_norm = uint8_transform(transform)
    views, views_norm = uint8_transform(view_transform) if view_transform is not None else (None, None)
    normalizers = {k: n for k, n in (("image", image_norm), ("views", views_norm)) if n is not None}
    return image, views, normalizers
