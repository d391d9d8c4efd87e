"""The contrastive and MLM text passes run as one (``ClipAlign.encode_text_and_tokens``) against
the two passes apart, the plain reference: same outputs, same gradients."""
from __future__ import annotations

import pytest
import torch

from clipalign.factory import create_model, get_tokenizer
from clipalign.masking import mask_tokens
from clipalign.model import text_length
from clipalign.precision import autocast

TOK = get_tokenizer("ca-nano")
CAPTIONS = ["a red circle", "a small blue square at the top left of the picture", "a green triangle",
            "two yellow stars next to a big purple cross", "orange"]


def _batch(model, trim: bool = True, rows: int | None = None):
    torch.manual_seed(0)
    ids = TOK(CAPTIONS)
    if trim:
        ids = ids[:, :text_length(ids, TOK.eot_token_id)]
    masked, labels = mask_tokens(ids, mask_id=model.mask_id, eot_id=TOK.eot_token_id, random_high=TOK.sot_token_id,
                                 rate=0.4, generator=torch.Generator().manual_seed(0))
    rows = rows or len(ids)
    return torch.randn(len(ids), 3, model.image_size, model.image_size), ids, masked[:rows], labels[:rows]


def _step(model, batch, joint: bool, precision: str = "fp32"):
    model.joint_text_pass = joint
    model.zero_grad(set_to_none=True)
    images, ids, masked, labels = batch
    with autocast(precision, "cpu"):
        out = model(images, ids, masked_text=masked, mlm_labels=labels)
        loss = (out["image_features"] @ out["text_features"].T).logsumexp(1).mean() \
            + torch.nn.functional.cross_entropy(out["mlm_logits"].float(), out["mlm_targets"])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("condition, trim, rows", [
    ("none", True, None),
    ("none", False, None),  # the full padded context: open_clip's own encode_text path
    ("none", True, 2),  # the MLM pass on the batch's first rows only (--mlm-fraction)
    ("image", True, 3),  # image-conditioned: the fusion head reads the same rows' image tokens
])
def test_one_pass_gives_the_two_passes_outputs_and_gradients(condition, trim, rows):
    torch.manual_seed(0)
    model = create_model("ca-nano", mlm_condition=condition).train()
    batch = _batch(model, trim, rows)
    assert model.joins_text_passes(batch[1], batch[2])
    joint, joint_grads = _step(model, batch, joint=True)
    apart, apart_grads = _step(model, batch, joint=False)
    for key in ("text_features", "image_features", "mlm_logits", "mlm_targets"):
        torch.testing.assert_close(joint[key], apart[key], rtol=1e-5, atol=1e-5)
    assert joint_grads.keys() == apart_grads.keys() and "mlm_head.dense.weight" in joint_grads
    for name, grad in apart_grads.items():
        torch.testing.assert_close(joint_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_in_bf16_the_one_pass_stays_within_bf16_of_the_two():
    torch.manual_seed(0)
    model = create_model("ca-nano").train()
    batch = _batch(model)
    joint, _ = _step(model, batch, joint=True, precision="bf16")
    apart, _ = _step(model, batch, joint=False, precision="bf16")
    torch.testing.assert_close(joint["text_features"].float(), apart["text_features"].float(), rtol=0, atol=2e-2)
    torch.testing.assert_close(joint["mlm_logits"].float(), apart["mlm_logits"].float(), rtol=0, atol=5e-2)


def test_towers_the_one_pass_would_change_run_apart():
    torch.manual_seed(0)
    coca = create_model("ca-coca-nano").train()  # a class token appended, pooled there: sees padding
    ids = TOK(CAPTIONS)
    assert not coca.joins_text_passes(ids, ids)
    model = create_model("ca-nano")
    assert not model.joins_text_passes(ids[:, :8], ids[:, :10])  # ids of two lengths
    model.joint_text_pass = False
    assert not model.joins_text_passes(ids, ids)
