import pytest
import torch
import torch.nn.functional as F

from clipalign.factory import create_model, get_tokenizer, list_models
from clipalign.masking import IGNORE_INDEX, mask_tokens
from clipalign.model import text_length, trims_text

PROJECT_MODELS = ["ca-nano", "ca-tiny", "ca-tiny-vit", "ca-small", "ca-coca-nano"]


@pytest.fixture(scope="module")
def nano():
    torch.manual_seed(0)
    return create_model("ca-nano").eval(), get_tokenizer("ca-nano")


def test_registry_lists_project_configs_first_then_open_clip():
    names = list_models()
    assert names[: len(PROJECT_MODELS)] == sorted(PROJECT_MODELS)
    assert "ViT-B-32" in names


@pytest.mark.parametrize("name", PROJECT_MODELS)
def test_every_project_model_trains_one_step_without_nan(name):
    model = create_model(name)
    tok = get_tokenizer(name)
    size = model.image_size
    texts = tok(["a red circle", "a blue square at the top left"])
    masked, labels = mask_tokens(texts, mask_id=model.mask_id, eot_id=tok.eot_token_id, random_high=tok.sot_token_id,
                                 generator=torch.Generator().manual_seed(0))
    out = model(torch.randn(2, 3, size, size), texts, masked, labels, caption=model.captions)  # CoCa: its decoder too
    sims = out["logit_scale"] * out["image_features"] @ out["text_features"].T
    loss = F.cross_entropy(sims, torch.arange(2)) + F.cross_entropy(out["mlm_logits"], out["mlm_targets"])
    if model.captions:
        loss = loss + F.cross_entropy(out["caption_logits"].flatten(0, 1), out["caption_labels"].flatten())
    loss.backward()
    assert torch.isfinite(loss)
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == [] or missing == ["mlm_head.mask_embedding"]  # unused if no position drew [MASK]


def test_open_clip_architecture_by_name_gets_the_head():
    model = create_model("RN50", mlm_head=False)
    assert model.mlm_head is None
    model = create_model("ViT-S-32-alt" if "ViT-S-32-alt" in list_models() else "ViT-B-32", force_image_size=32)
    assert model.mlm_head is not None and model.mask_id == model.vocab_size


def test_none_overrides_are_dropped_and_pretrained_must_be_local(tmp_path):
    assert create_model("ca-nano", force_image_size=None).image_size == 32
    with pytest.raises(FileNotFoundError):
        create_model("ca-nano", pretrained="laion2b_s34b_b79k")


def test_clean_text_path_is_open_clips_encode_text(nano):
    model, tok = nano
    ids = tok(["a red circle", "two green stars"])
    assert torch.equal(model.encode_text(ids), model.clip.encode_text(ids))


def test_masked_pass_is_bidirectional_and_ignores_padding(nano):
    model, tok = nano
    ids = tok(["a small red triangle at the top left"])
    eot = (ids[0] == tok.eot_token_id).nonzero()[0, 0].item()
    with torch.no_grad():
        base = model.encode_text_tokens(ids)
        later = ids.clone()
        later[0, eot - 1] = tok.encoder["blue</w>"]
        changed = model.encode_text_tokens(later)
        padded = ids.clone()
        padded[0, eot + 1 :] = 500  # garbage after end-of-text
        repadded = model.encode_text_tokens(padded)
    # A token early in the caption sees a change at its end: no causal mask.
    assert not torch.allclose(base[0, 1], changed[0, 1])
    # No real position attends to what follows end-of-text.
    assert torch.allclose(base[0, : eot + 1], repadded[0, : eot + 1], atol=1e-5)


def test_mask_id_above_end_of_text_never_reaches_argmax_pooling(nano):
    model, tok = nano
    ids = tok(["a red circle"])
    masked, labels = mask_tokens(ids, mask_id=model.mask_id, eot_id=tok.eot_token_id, random_high=tok.sot_token_id,
                                 rate=1.0, generator=torch.Generator().manual_seed(1))
    assert masked.max() == model.mask_id > tok.eot_token_id
    with torch.no_grad():
        out = model(None, ids, masked, labels)
        clean = model.clip.encode_text(ids, normalize=True)
    assert out["mlm_logits"].shape == (int((labels != IGNORE_INDEX).sum()), model.vocab_size)
    # The contrastive features still come from the clean ids, pooled at end-of-text.
    assert torch.allclose(out["text_features"], clean)
    # Had the masked ids been pooled by argmax, a [MASK] position would have been taken.
    assert masked.argmax(-1).item() != (ids == tok.eot_token_id).int().argmax(-1).item()


def test_mlm_logits_only_at_masked_positions_equal_full_sequence_loss(nano):
    model, tok = nano
    ids = tok(["a small red triangle at the top left", "a blue circle"])
    masked, labels = mask_tokens(ids, mask_id=model.mask_id, eot_id=tok.eot_token_id, random_high=tok.sot_token_id,
                                 rate=0.3, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, targets = model.mlm_logits(masked, labels)
        hidden = model.encode_text_tokens(masked)  # (B, L, W)
        emb = model.clip.token_embedding.weight
        full = model.mlm_head(hidden.flatten(0, 1), emb)  # (B*L, V): every position
    full_loss = F.cross_entropy(full, labels.flatten(), ignore_index=IGNORE_INDEX)
    assert torch.allclose(F.cross_entropy(logits, targets), full_loss, atol=1e-5)


def test_padded_mlm_rows_change_neither_the_loss_nor_its_gradients():
    torch.manual_seed(0)
    model = create_model("ca-nano")
    tok = get_tokenizer("ca-nano")
    ids = tok(["a small red triangle at the top left", "a blue circle", "a green square at the bottom"])
    masked, labels = mask_tokens(ids, mask_id=model.mask_id, eot_id=tok.eot_token_id, random_high=tok.sot_token_id,
                                 rate=0.3, generator=torch.Generator().manual_seed(2))

    def losses_and_grads(multiple):
        model.zero_grad()
        logits, targets = model.mlm_logits(masked, labels, row_multiple=multiple)
        mean, summed = F.cross_entropy(logits, targets), F.cross_entropy(logits, targets, reduction="sum")
        (mean + summed).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return logits, targets, mean.detach(), summed.detach(), grads

    plain = losses_and_grads(1)
    padded = losses_and_grads(16)
    m = len(plain[1])
    assert m % 16 and len(padded[1]) == -(-m // 16) * 16  # rounded up to the multiple
    assert torch.equal(padded[1][:m], plain[1]) and (padded[1][m:] == IGNORE_INDEX).all()
    torch.testing.assert_close(padded[0][:m], plain[0])  # the real rows' logits are the same
    torch.testing.assert_close(padded[2], plain[2])
    torch.testing.assert_close(padded[3], plain[3])
    assert padded[4].keys() == plain[4].keys()
    for name, grad in plain[4].items():
        torch.testing.assert_close(padded[4][name], grad, msg=lambda msg: f"{name}: {msg}")


def test_mlm_decoder_is_tied_to_the_token_embedding(nano):
    model, _ = nano
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.startswith("mlm_head") and "weight" in n and "dense" not in n and "norm" not in n for n in names)
    assert sum(p.numel() for p in model.mlm_head.parameters()) < model.clip.token_embedding.weight.numel()


CAPTIONS = ["a red circle", "a small blue square at the top left of the picture", "a green triangle"]


@pytest.mark.parametrize("custom_text", [False, True])  # CLIP, and CustomTextCLIP's TextTransformer
def test_text_without_common_padding_gives_the_same_features(custom_text):
    torch.manual_seed(0)
    model = create_model("ca-nano", mlm_head=False, force_custom_text=custom_text).eval()
    tok = get_tokenizer("ca-nano")
    ids = tok(CAPTIONS)
    length = text_length(ids, tok.eot_token_id)
    assert length == int((ids == tok.eot_token_id).int().argmax(1).max()) + 1 < ids.shape[1]
    assert model.trims_text
    with torch.no_grad():
        full = model.clip.encode_text(ids, normalize=True)  # open_clip's own, on the padded ids
        short = model.encode_text(ids[:, :length], normalize=True)
    torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-6)


def test_text_length_keeps_everything_when_a_caption_fills_the_context():
    tok = get_tokenizer("ca-nano")
    ids = tok(["word " * 100, "a red circle"])  # the first is cut at the context: no end-of-text
    assert text_length(ids, tok.eot_token_id) == ids.shape[1]


def test_towers_that_see_padding_are_not_trimmed():
    coca_like = create_model("ca-nano", mlm_head=False, force_custom_text=True).clip.text
    coca_like.pool_type = "last"  # SigLIP's pooling: the last position, padding included
    assert not trims_text(coca_like)
    coca_like.pool_type, coca_like.attn_mask = "argmax", None  # bidirectional attention
    assert not trims_text(coca_like)


def test_a_resnet_tower_sees_channels_last_images_and_gives_the_same_features():
    torch.manual_seed(0)
    model = create_model("ca-tiny").eval()  # open_clip's ModifiedResNet
    assert model.channels_last and not create_model("ca-nano").channels_last  # a ViT keeps its layout
    seen = []
    model.clip.visual.conv1.register_forward_pre_hook(
        lambda _, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        fast = model.encode_image(images)
        features, _ = model.encode_image_and_tokens(images)
        plain = model.clip.encode_image(images)  # open_clip's own call, on the contiguous batch
    assert seen == [True, True, False]
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(features, plain, rtol=1e-4, atol=1e-5)


def test_channels_last_gives_the_same_gradients():
    torch.manual_seed(0)
    model = create_model("ca-tiny")
    images = torch.randn(4, 3, 64, 64)
    grads = []
    for fast in (True, False):
        model.zero_grad()
        model.channels_last = fast
        model.encode_image(images).square().sum().backward()
        grads.append([p.grad.clone() for p in model.clip.visual.parameters()])
    scale = max(g.abs().max().item() for g in grads[1])
    for fast, plain in zip(*grads):  # the same sums in another order: fp32 rounding apart
        torch.testing.assert_close(fast, plain, rtol=1e-3, atol=1e-5 * scale)
