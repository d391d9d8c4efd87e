"""BERT-style token masking for the masked-token (MLM) objective on the text tower."""
from __future__ import annotations

from typing import Any, Callable

import torch

IGNORE_INDEX = -100  # label of positions that are not predicted (torch's cross-entropy default)
MLM_TARGETS = ("any", "content")
# Function words (and caption-template words) that ``--mlm-target content`` never masks: what is
# left names, describes and places things.
STOP_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "in", "on", "at", "to", "and", "or", "with", "is", "are", "was", "be", "it", "its",
    "this", "that", "these", "those", "there", "here", "for", "from", "by", "as", "into", "some", "his", "her",
    "their", "has", "have", "very", "photo", "picture", "image", "emoji", "icon", "showing", "shows",
    ".", ",", ":", ";", "!", "?", "-", "'s",
)


def stop_token_ids(tokenizer: Callable[[list[str]], torch.Tensor], eot_id: int) -> torch.Tensor:
    """The ids of the one-token ``STOP_WORDS`` under ``tokenizer`` (open_clip's BPE: all of them)."""
    ids = tokenizer(list(STOP_WORDS))  # (S, L): start, the word's tokens, end, padding
    words = [row[1 : int((row == eot_id).int().argmax())] for row in ids]
    return torch.unique(torch.cat([w for w in words if len(w) == 1]))


def content_positions(ids: torch.Tensor, eot_id: int, stop_ids: torch.Tensor) -> torch.Tensor:
    """Maskable positions whose token is not a stop word: (B, L) ids → (B, L) bool."""
    return maskable_positions(ids, eot_id) & ~torch.isin(ids, stop_ids.to(ids.device))


def maskable_positions(ids: torch.Tensor, eot_id: int) -> torch.Tensor:
    """Positions that may be masked: strictly between start-of-text and end-of-text.

    open_clip pads with id 0, which is also a real token ("!"), so padding is found by
    position (after the end-of-text token), never by value.

    Args:
        ids: (B, L) token ids as produced by open_clip's tokenizer (start token at 0).
        eot_id: the end-of-text token id.

    Returns:
        (B, L) bool.
    """
    pos = torch.arange(ids.shape[1], device=ids.device)
    has_eot = (ids == eot_id).any(dim=1)
    eot_pos = torch.where(has_eot, (ids == eot_id).int().argmax(dim=1), ids.shape[1])
    return (pos > 0) & (pos < eot_pos[:, None])


def masking_ids(tokenizer: Any, mask_id: int) -> dict[str, Any]:
    """``mask_tokens``' id arguments for ``tokenizer`` and a model's ``mask_id``.

    open_clip's BPE puts its two special tokens last, so random replacements are drawn below
    start-of-text. A Hugging Face tokenizer (``hf_text.HfTokenizer``) has its special ids
    anywhere in the vocabulary (BERT: ``[PAD]`` 0, ``[UNK]`` 100, ``[CLS]`` 101, ...): they
    are never chosen and never drawn.
    """
    ids: dict[str, Any] = {"mask_id": mask_id, "eot_id": tokenizer.eot_token_id}
    special = getattr(tokenizer, "special_ids", None)
    if special is None:
        return {**ids, "random_high": tokenizer.sot_token_id}
    return {**ids, "random_high": tokenizer.vocab_size, "special_ids": torch.tensor(special, dtype=torch.long)}


def mask_tokens(
    ids: torch.Tensor,
    *,
    mask_id: int,
    eot_id: int,
    random_high: int,
    rate: float = 0.15,
    generator: torch.Generator | None = None,
    stop_ids: torch.Tensor | None = None,
    special_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose ``rate`` of each caption's tokens to predict, BERT-style (80/10/10).

    Of the chosen positions, 80 % become ``mask_id``, 10 % a random token in
    ``[0, random_high)`` (less ``special_ids``) and 10 % stay unchanged. Start, end and
    padding tokens are never chosen, nor are ``special_ids``, and every caption with at least
    one real token gets at least one chosen.

    Args:
        ids: (B, L) token ids.
        mask_id: id written at masked positions (may lie outside the vocabulary).
        eot_id: end-of-text id.
        random_high: random replacements are drawn from ``[0, random_high)``; pass the
            first special-token id so that no special token is ever inserted.
        rate: fraction of maskable tokens to choose.
        generator: source of randomness (for reproducible masks).
        stop_ids: if given, choose only tokens that are not among these ids (``content_positions``;
            a caption made only of stop words falls back to all its tokens).
        special_ids: (S,) ids never chosen and never drawn as replacements (a tokenizer whose
            special tokens sit inside ``[0, random_high)``; ``masking_ids`` gives them).

    Returns:
        ``(masked_ids, labels)``, both (B, L): ``labels`` holds the original id at chosen
        positions and ``IGNORE_INDEX`` elsewhere.
    """
    maskable = maskable_positions(ids, eot_id)
    if special_ids is not None:
        maskable &= ~torch.isin(ids, special_ids.to(ids.device))
    if stop_ids is not None:
        content = maskable & ~torch.isin(ids, stop_ids.to(ids.device))  # content_positions, less the specials
        maskable = torch.where(content.any(dim=1, keepdim=True), content, maskable)
    u = torch.rand(ids.shape, generator=generator, device=ids.device)
    chosen = maskable & (u < rate)

    # Guarantee one prediction per caption: take the maskable position with the smallest draw.
    need_one = maskable.any(dim=1) & ~chosen.any(dim=1)
    first = torch.where(maskable, u, 2.0).argmin(dim=1)
    chosen[need_one, first[need_one]] = True

    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
    action = torch.rand(ids.shape, generator=generator, device=ids.device)
    if special_ids is None:
        random_ids = torch.randint(0, random_high, ids.shape, generator=generator, device=ids.device)
    else:
        allowed = torch.arange(random_high, device=ids.device)
        allowed = allowed[~torch.isin(allowed, special_ids.to(ids.device))]
        random_ids = allowed[torch.randint(0, len(allowed), ids.shape, generator=generator, device=ids.device)]
    masked = torch.where(chosen & (action < 0.8), torch.full_like(ids, mask_id), ids)
    masked = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, masked)
    return masked, labels
