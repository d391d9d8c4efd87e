"""Inference-only forms of a model's image tower: never trained, never saved.

A convolution followed by a batch norm in eval mode is one affine map, and torch's
``fuse_conv_bn_eval`` folds the two into one convolution. ``image_encoder`` embeds with a copy of
the image tower folded that way: the same features without the batch norms' pass over every
activation, a fifth of a ``ca-tiny`` (ModifiedResNet) forward in fp32 (BENCHMARKS.md). The
model itself, its state dict and its checkpoints are untouched.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from clipalign.model import ClipAlign

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def conv_bn_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """``(conv, batch norm)`` submodule names where the batch norm takes the convolution's output
    and nothing else does, each module called once in ``module``'s forward (traced with
    ``torch.fx``; a forward it cannot trace has no pairs)."""
    try:
        graph = fx.symbolic_trace(module).graph
    except Exception:  # data-dependent control flow, or a call fx cannot follow: fold nothing
        return []
    modules = dict(module.named_modules())
    calls = [node for node in graph.nodes if node.op == "call_module"]
    once = {name for name in modules if sum(node.target == name for node in calls) == 1}
    pairs = []
    for node in calls:
        source = node.args[0] if node.args else None
        if (isinstance(modules[node.target], _BATCH_NORMS) and isinstance(source, fx.Node)
                and source.op == "call_module" and isinstance(modules[source.target], _CONVS)
                and len(source.users) == 1 and {node.target, source.target} <= once):
            pairs.append((source.target, node.target))
    return pairs


def fold_batch_norms(module: nn.Module) -> int:
    """Fold each batch norm of ``conv_bn_pairs`` into its convolution, in place (the batch norm
    becomes ``nn.Identity``); returns how many were folded. ``module`` must be in eval mode."""
    if module.training:
        raise ValueError("batch norms fold only in eval mode (running statistics)")
    pairs = conv_bn_pairs(module)
    for conv, norm in pairs:
        module.set_submodule(conv, fuse_conv_bn_eval(module.get_submodule(conv), module.get_submodule(norm)))
        module.set_submodule(norm, nn.Identity())
    return len(pairs)


def image_encoder(model: ClipAlign) -> Callable[[torch.Tensor], torch.Tensor]:
    """(B, 3, H, W) images → (B, D) L2-normalised features, as ``model.encode_image(·, normalize=True)``.

    In eval mode, an image tower with batch norms after its convolutions runs as a folded
    copy (``fold_batch_norms``), made now: the encoder sees the weights as they are at this call.
    The features still come from open_clip's own ``encode_image``, on a shallow copy of the model
    that holds the folded tower.
    """
    def plain(images: torch.Tensor) -> torch.Tensor:
        return model.encode_image(images, normalize=True)

    clip = getattr(model, "clip", None)
    visual = getattr(clip, "visual", None)
    if model.training or visual is None or not any(isinstance(m, _BATCH_NORMS) for m in visual.modules()):
        return plain
    folded = copy.deepcopy(visual)
    if not fold_batch_norms(folded):
        return plain
    inference_clip = copy.copy(clip)  # the same modules and parameters, but for its image tower
    inference_clip._modules = {**clip._modules, "visual": folded}
    return lambda images: inference_clip.encode_image(model.channel_layout(images), normalize=True)
