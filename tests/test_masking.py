import torch

from clipalign.factory import get_tokenizer
from clipalign.masking import IGNORE_INDEX, mask_tokens, maskable_positions

TOK = get_tokenizer("ca-nano")
SOT, EOT, MASK = TOK.sot_token_id, TOK.eot_token_id, TOK.vocab_size
CAPTIONS = ["a small red triangle at the top left", "a blue circle next to a yellow square", "a star", "x"]


def _mask(ids, seed=0, rate=0.15):
    return mask_tokens(ids, mask_id=MASK, eot_id=EOT, random_high=SOT, rate=rate,
                       generator=torch.Generator().manual_seed(seed))


def test_maskable_positions_are_the_real_tokens_only():
    ids = TOK(CAPTIONS)
    maskable = maskable_positions(ids, EOT)
    for row, caption in zip(ids, maskable):
        eot = (row == EOT).nonzero()[0, 0]
        assert not caption[0] and not caption[eot:].any()  # start, end and padding
        assert caption[1:eot].all()
    # Id 0 is a real sub-word ("!") as well as padding: inside a caption it stays maskable.
    ids[0, 2] = 0
    assert maskable_positions(ids, EOT)[0, 2]


def test_never_masks_special_tokens_or_padding():
    ids = TOK(CAPTIONS * 50)
    for seed in range(5):
        masked, labels = _mask(ids, seed, rate=0.5)
        chosen = labels != IGNORE_INDEX
        assert not (chosen & ~maskable_positions(ids, EOT)).any()
        unchanged = ~chosen
        assert torch.equal(masked[unchanged], ids[unchanged])
        assert not ((masked == SOT) | (masked == EOT))[chosen].any()


def test_at_least_one_mask_per_caption():
    ids = TOK(CAPTIONS * 100)
    masked, labels = _mask(ids, rate=0.01)
    assert ((labels != IGNORE_INDEX).sum(1) >= 1).all()
    assert torch.equal(labels[labels != IGNORE_INDEX], ids[labels != IGNORE_INDEX])


def test_rate_and_80_10_10_split():
    ids = TOK(["one two three four five six seven eight nine ten eleven twelve"] * 4000)
    masked, labels = _mask(ids, rate=0.15)
    chosen = labels != IGNORE_INDEX
    n = chosen.sum().item()
    # 12 real tokens: rows left empty by the 15 % draw get one forced pick.
    expected = 0.15 + 0.85**12 / 12
    assert abs(n / maskable_positions(ids, EOT).sum().item() - expected) < 0.005
    to_mask = (masked[chosen] == MASK).float().mean().item()
    kept = (masked[chosen] == ids[chosen]).float().mean().item()
    random = 1 - to_mask - kept
    # Random replacements equal the original with probability ~1/49406: negligible.
    assert abs(to_mask - 0.8) < 0.02 and abs(kept - 0.1) < 0.015 and abs(random - 0.1) < 0.015
    assert (masked[chosen & (masked != MASK)] < SOT).all()


def test_same_generator_seed_same_masks():
    ids = TOK(CAPTIONS)
    a, b = _mask(ids, seed=3), _mask(ids, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_content_target_masks_no_stop_word_and_falls_back_when_there_is_none():
    from clipalign.masking import content_positions, stop_token_ids

    stop = stop_token_ids(TOK, EOT)
    ids = TOK(["a red circle to the left of a blue star"] * 200 + ["the of a"])
    words = {int(i) for i in TOK(["red circle left blue star"])[0, 1:6]}
    masked, labels = mask_tokens(ids, mask_id=MASK, eot_id=EOT, random_high=SOT, rate=0.3, stop_ids=stop,
                                 generator=torch.Generator().manual_seed(0))
    chosen = {int(t) for t in labels[:200][labels[:200] != IGNORE_INDEX]}
    assert chosen == words  # every content word gets masked somewhere, never "a", "the", "of", "to"
    assert (labels[200] != IGNORE_INDEX).sum() >= 1  # only stop words: still one prediction
    assert not content_positions(ids[200:], EOT, stop).any()
    # the plain target draws stop words too
    _, plain = _mask(ids[:200], rate=0.3)
    assert {int(t) for t in plain[plain != IGNORE_INDEX]} > words


def test_special_ids_inside_the_vocabulary_are_never_chosen_nor_drawn():
    # a BERT-like layout: [PAD] 0, [UNK] 7, [CLS] 8, [SEP] 9, [MASK] 10, words elsewhere in [0, 40)
    pad, unk, cls, sep, mask = 0, 7, 8, 9, 10
    special = torch.tensor([pad, unk, cls, sep, mask])
    rows = [[cls, 3, unk, 12, 30, sep, pad, pad], [cls, unk, sep, pad, pad, pad, pad, pad],
            [cls, 1, 2, 3, 4, 5, 6, sep]]
    ids = torch.tensor(rows * 200)
    drawn = set()
    for seed in range(5):
        masked, labels = mask_tokens(ids, mask_id=mask, eot_id=sep, random_high=40, rate=0.9, special_ids=special,
                                     generator=torch.Generator().manual_seed(seed))
        chosen = labels != IGNORE_INDEX
        assert not torch.isin(ids[chosen], special).any()  # [UNK] is never a target
        assert not chosen[1::3].any()  # a caption of specials only has nothing to predict
        replaced = masked[chosen & (masked != mask) & (masked != ids)]
        assert not torch.isin(replaced, special).any()
        drawn |= set(replaced.tolist())
    assert drawn == set(range(40)) - set(special.tolist())  # the rest of the vocabulary, all of it


def test_an_empty_special_set_draws_exactly_what_random_high_alone_draws():
    ids = TOK(CAPTIONS * 20)
    plain = _mask(ids, seed=1, rate=0.5)
    none_special = mask_tokens(ids, mask_id=MASK, eot_id=EOT, random_high=SOT, rate=0.5,
                               special_ids=torch.tensor([], dtype=torch.long), generator=torch.Generator().manual_seed(1))
    assert torch.equal(plain[0], none_special[0]) and torch.equal(plain[1], none_special[1])


def test_masking_ids_of_open_clips_tokenizer_are_the_ones_training_always_used():
    from clipalign.masking import masking_ids

    assert masking_ids(TOK, MASK) == {"mask_id": MASK, "eot_id": EOT, "random_high": SOT}
