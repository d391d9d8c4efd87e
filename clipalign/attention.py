"""Self-attention without ``nn.MultiheadAttention``'s packing overhead, same weights and math.

open_clip's towers run ``nn.MultiheadAttention`` (batch first). On a CPU its training path
spends far more time around the attention than in it: the packed in-projection is split with
``select`` (whose backward zero-fills and adds a (3, L, B, E) tensor three times), batch-first
inputs are transposed to (L, B, E) and back, and the math SDPA kernel scales q and k apart and
scans the mask for fully masked rows. On a ``ca-small`` step (Xeon, AMX, bf16) that was about a
third of the time for a few percent of the FLOPs (BENCHMARKS.md).

``FastMultiheadAttention`` is a subclass that computes self-attention as one in-projection,
one reshape to (B*H, L, D), ``baddbmm``/``bmm`` and softmax on the CPU (PyTorch's fused SDPA on
a GPU), and the out-projection. Its parameters are the module's own, so state dicts, exports
and checkpoints are unchanged; anything else (cross-attention, ``need_weights``, padding masks
given as ``key_padding_mask``, boolean masks) takes ``nn.MultiheadAttention``'s own path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FastMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with a lean batch-first self-attention path (see the module doc)."""

    def _takes_fast_path(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         key_padding_mask: torch.Tensor | None, need_weights: bool,
                         attn_mask: torch.Tensor | None, is_causal: bool) -> bool:
        return (query is key and key is value and self.batch_first and self._qkv_same_embed_dim
                and query.dim() == 3 and not need_weights and key_padding_mask is None and not is_causal
                and self.bias_k is None and not self.add_zero_attn
                and (attn_mask is None or attn_mask.is_floating_point()))

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self._takes_fast_path(query, key, value, key_padding_mask, need_weights, attn_mask, is_causal):
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        return self_attention(query, self.in_proj_weight, self.in_proj_bias, self.out_proj.weight,
                              self.out_proj.bias, self.num_heads, attn_mask,
                              self.dropout if self.training else 0.0), None


def self_attention(x: torch.Tensor, in_weight: torch.Tensor, in_bias: torch.Tensor | None,
                   out_weight: torch.Tensor, out_bias: torch.Tensor | None, heads: int,
                   attn_mask: torch.Tensor | None = None, dropout: float = 0.0) -> torch.Tensor:
    """Multi-head self-attention, as ``nn.MultiheadAttention`` computes it.

    Args:
        x: (B, L, E) inputs.
        in_weight, in_bias: the packed (3E, E) and (3E,) q, k, v projection.
        out_weight, out_bias: the (E, E) and (E,) output projection.
        attn_mask: an additive float mask, (L, L) or (B*heads, L, L).

    Returns:
        (B, L, E).
    """
    b, length, width = x.shape
    d = width // heads
    # one copy into per-head layout: (3, B*H, L, D)
    qkv = F.linear(x, in_weight, in_bias).view(b, length, 3, heads, d).permute(2, 0, 3, 1, 4)
    if x.is_cuda:  # the fused kernels win on a GPU
        q, k, v = qkv.unbind(0)  # (B, H, L, D)
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.view(b, heads, length, length)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p=dropout)
    else:
        q, k, v = qkv.reshape(3, b * heads, length, d).unbind(0)
        scale = d ** -0.5
        if attn_mask is None:
            scores = torch.bmm(q, k.transpose(1, 2)) * scale
        else:
            scores = torch.baddbmm(attn_mask.to(q.dtype).expand(b * heads, length, length), q, k.transpose(1, 2),
                                   alpha=scale)
        probs = scores.softmax(-1)
        if dropout > 0:
            probs = F.dropout(probs, dropout)
        out = torch.bmm(probs, v).view(b, heads, length, d)
    return F.linear(out.transpose(1, 2).reshape(b, length, width), out_weight, out_bias)


def use_fast_attention(model: nn.Module) -> int:
    """Make every plain ``nn.MultiheadAttention`` in ``model`` a ``FastMultiheadAttention``.

    In place and parameter for parameter (the same tensors: an optimizer built before still
    updates them); returns how many modules changed.
    """
    changed = 0
    for module in model.modules():
        if type(module) is nn.MultiheadAttention:
            module.__class__ = FastMultiheadAttention  # a subclass adding no state: the swap is exact
            changed += 1
    return changed
