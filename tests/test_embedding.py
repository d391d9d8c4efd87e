"""Batched inference: batches made ahead in a thread keep order, raise where they fail, never hang."""
from __future__ import annotations

import threading

import pytest
import torch

from clipalign.embedding import prefetched_batches


def _items(n: int, fail_at: int | None = None):
    for i in range(n):
        if i == fail_at:
            raise OSError(f"item {i} unreadable")
        yield torch.full((1, 2, 2), float(i)), {"i": i}


def test_batches_keep_the_order_and_the_last_partial_batch():
    batches = list(prefetched_batches(_items(10), lambda x: x * 2, batch_size=4))
    assert [len(p) for _, p in batches] == [4, 4, 2]
    assert [p["i"] for _, ps in batches for p in ps] == list(range(10))
    images = torch.cat([b for b, _ in batches])
    assert images.shape == (10, 1, 2, 2)
    assert images[:, 0, 0, 0].tolist() == [2.0 * i for i in range(10)]


def test_a_failure_is_raised_after_the_batches_made_before_it():
    got = []
    with pytest.raises(OSError, match="item 9"):
        for _, payloads in prefetched_batches(_items(12, fail_at=9), lambda x: x, batch_size=4):
            got.extend(p["i"] for p in payloads)
    assert got == list(range(8))


def test_stopping_early_ends_the_producer_thread():
    before = threading.active_count()
    batches = prefetched_batches(_items(1000), lambda x: x, batch_size=2, depth=1)
    next(batches)
    batches.close()  # the consumer stops (a break, an exception in its loop)
    assert threading.active_count() == before
    assert not any(t.name == "clipalign-prefetch" for t in threading.enumerate())


def test_auto_precision_embeds_as_the_precision_it_resolves_to():
    from clipalign.embedding import image_features
    from clipalign.factory import create_model_and_transforms
    from clipalign.precision import resolve_precision
    from PIL import Image

    torch.manual_seed(0)
    model, _, transform = create_model_and_transforms("ca-nano", mlm_head=False)
    model.eval()
    images = [(Image.new("RGB", (40, 40), (i * 40, 255 - i * 30, 90)), i) for i in range(5)]
    auto, _ = image_features(model, transform, images, batch_size=2, precision="auto")
    chosen, _ = image_features(model, transform, images, batch_size=2, precision=resolve_precision("auto"))
    other, _ = image_features(model, transform, images, batch_size=2,
                              precision="fp32" if resolve_precision("auto") == "bf16" else "bf16")
    assert torch.equal(auto, chosen)
    assert not torch.equal(auto, other)


def test_text_features_trimmed_shortest_first_equal_open_clip_on_the_padded_ids(monkeypatch):
    from clipalign import embedding
    from clipalign.factory import create_model, get_tokenizer

    torch.manual_seed(0)
    model = create_model("ca-nano", mlm_head=False).eval()
    tok = get_tokenizer("ca-nano")
    texts = [" ".join(["word"] * n) for n in (9, 1, 30, 4, 4, 12, 2, 7, 100, 3)]  # 100 words: cut, no end-of-text
    monkeypatch.setattr(embedding, "TEXT_WINDOW", 2)  # windows of 2 batches of 3: the sort stays within each
    widths = []
    encode = model.encode_text
    monkeypatch.setattr(model, "encode_text",
                        lambda ids, normalize: widths.append(ids.shape[1]) or encode(ids, normalize))
    got = embedding.text_features(model, tok, texts, batch_size=3)
    with torch.no_grad():
        expected = model.clip.encode_text(tok(texts), normalize=True)  # open_clip's own, one padded batch
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    context = tok(texts).shape[1]
    # window 1 (texts 0-5): lengths 11, 3, 32, 6, 6, 14 -> batches [3, 6, 6] and [11, 14, 32]
    assert widths == [6, context, 9, context]
