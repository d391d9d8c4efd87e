"""The lean self-attention path equals nn.MultiheadAttention: outputs, gradients, masks, fallbacks."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from clipalign.attention import FastMultiheadAttention, use_fast_attention
from clipalign.factory import create_model, get_tokenizer


def _pair(width: int = 32, heads: int = 4) -> tuple[nn.MultiheadAttention, nn.MultiheadAttention]:
    torch.manual_seed(0)
    plain = nn.MultiheadAttention(width, heads, batch_first=True)
    fast = copy.deepcopy(plain)
    assert use_fast_attention(fast) == 1
    return plain, fast


def _causal(length: int) -> torch.Tensor:
    return torch.full((length, length), float("-inf")).triu(1)


def _padding(batch: int, heads: int, length: int, lengths: list[int]) -> torch.Tensor:
    keys = torch.arange(length)[None, :] >= torch.tensor(lengths)[:, None]  # (B, L) padding keys
    mask = torch.zeros(batch, 1, 1, length).masked_fill(keys[:, None, None, :], float("-inf"))
    return mask.expand(batch, heads, length, length).reshape(batch * heads, length, length)


@pytest.mark.parametrize("mask", ["none", "causal", "padding"])
def test_fast_self_attention_equals_multihead_attention_forward_and_backward(mask):
    plain, fast = _pair()
    x = torch.randn(3, 7, 32)
    attn_mask = {"none": None, "causal": _causal(7), "padding": _padding(3, 4, 7, [7, 4, 1])}[mask]
    outs, grads = [], []
    for module in (plain, fast):
        xi = x.clone().requires_grad_()
        out = module(xi, xi, xi, need_weights=False, attn_mask=attn_mask)[0]
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out)
        grads.append([xi.grad] + [p.grad for p in module.parameters()])
    torch.testing.assert_close(outs[1], outs[0], atol=1e-6, rtol=1e-5)
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_fast_attention_under_bf16_autocast_is_within_bf16_of_the_plain_path():
    plain, fast = _pair(64, 4)
    x = torch.randn(4, 17, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = plain(x, x, x, need_weights=False, attn_mask=_causal(17))[0].float()
        got = fast(x, x, x, need_weights=False, attn_mask=_causal(17))[0].float()
    assert (got - want).abs().max() < 0.02 * want.abs().max()


def test_cross_attention_and_attention_weights_take_the_plain_path():
    plain, fast = _pair()
    q, kv = torch.randn(2, 5, 32), torch.randn(2, 9, 32)
    torch.testing.assert_close(fast(q, kv, kv)[0], plain(q, kv, kv)[0])
    out, weights = fast(q, q, q, need_weights=True)
    assert weights is not None and weights.shape == (2, 5, 5)
    pad = torch.tensor([[False] * 5, [False, False, True, True, True]])
    torch.testing.assert_close(fast(q, q, q, key_padding_mask=pad)[0], plain(q, q, q, key_padding_mask=pad)[0])


def test_the_swap_keeps_parameters_and_state_dict_and_open_clip_embeddings():
    import open_clip

    torch.manual_seed(0)
    model = create_model("ca-nano", mlm_head=False)
    attns = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    assert attns and all(type(m) is FastMultiheadAttention for m in attns)
    reference = open_clip.create_model("ca-nano")  # the factory registers the project's configs
    reference.load_state_dict(model.clip.state_dict())
    assert not any(type(m) is FastMultiheadAttention for m in reference.modules())
    reference.eval(), model.eval()
    images = torch.randn(3, 3, model.image_size, model.image_size)
    texts = get_tokenizer("ca-nano")(["a red circle", "two small blue squares", "x"])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images, normalize=True),
                                   reference.encode_image(images, normalize=True), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.encode_text(texts, normalize=True),
                                   reference.encode_text(texts, normalize=True), atol=1e-5, rtol=1e-5)
