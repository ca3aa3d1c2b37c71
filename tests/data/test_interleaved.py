"""Interleaved documents: media tokens, end-of-chunk tokens, image padding, LM labels."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import MINILM, jpeg_bytes, write_tar

from vlp.data import HFTokenizer, Manifest, Source, Split, Tokenizer, WebDataModule
from vlp.data.collate import Collator
from vlp.data.interleaved import interleaved_batch, lm_labels, media_text
from vlp.errors import ConfigError, DataError

I = -100  # noqa: E741


class WordTokenizer(Tokenizer):
    """Whitespace words and special tokens; pad 0, <s> 1, </s> 2, <image> 3, <|endofchunk|> 4."""

    def __init__(self, words: str, max_length: int = 32) -> None:
        self.vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<image>": 3, "<|endofchunk|>": 4}
        for w in words.split():
            self.vocab.setdefault(w, len(self.vocab))
        self.max_length = max_length

    def token_id(self, token: str) -> int:
        return self.vocab[token]

    def __call__(self, texts):
        rows = []
        for t in texts:
            pieces = re.split(r"(<image>|<\|endofchunk\|>)", t)
            words = [w for p in pieces for w in ([p] if p in self.vocab and p.startswith("<") else p.split())]
            rows.append(([1] + [self.vocab[w] for w in words] + [2])[: self.max_length])
        n = max(map(len, rows))
        ids = torch.tensor([r + [0] * (n - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


TOK = WordTokenizer("intro a red circle . blue square")
# ids: intro 5, a 6, red 7, circle 8, . 9, blue 10, square 11


def _img(value: int) -> torch.Tensor:
    return torch.full((3, 2, 2), value, dtype=torch.uint8)


def test_media_text_closes_every_chunk():
    assert media_text("intro <image> a red circle . <image> blue square", 2, "k") == (
        "intro<image>a red circle .<|endofchunk|><image>blue square<|endofchunk|>"
    )
    assert media_text("<image> a<|endofchunk|>", 1, "k") == "<image>a<|endofchunk|>"  # not doubled


def test_hand_written_documents_give_hand_computed_labels():
    docs = ["intro <image> a red circle . <image> blue square", "<image> red ."]
    images = [[_img(1), _img(2)], [_img(3)]]
    b = interleaved_batch(docs, images, ["doc0", "doc1"], TOK)
    # doc0: <s> intro <image> a red circle . <eoc> <image> blue square <eoc> </s>
    # doc1: <s> <image> red . <eoc> </s> + padding
    assert b["text_ids"].tolist() == [
        [1, 5, 3, 6, 7, 8, 9, 4, 3, 10, 11, 4, 2],
        [1, 3, 7, 9, 4, 2, 0, 0, 0, 0, 0, 0, 0],
    ]
    assert b["media_mask"].tolist() == [
        [False, False, True, False, False, False, False, False, True, False, False, False, False],
        [False, True] + [False] * 11,
    ]
    # position t predicts token t + 1; no target: padding, media tokens, text before the first image
    assert b["lm_labels"].tolist() == [
        [I, I, 6, 7, 8, 9, 4, I, 10, 11, 4, 2, I],
        [I, 7, 9, 4, 2, I, I, I, I, I, I, I, I],
    ]
    assert b["images"].shape == (2, 2, 3, 2, 2)
    assert b["images_mask"].tolist() == [[True, True], [True, False]]
    assert b["num_images"].tolist() == [2, 1]
    assert b["images"][0, 1].eq(2).all() and b["images"][1, 0].eq(3).all() and b["images"][1, 1].eq(0).all()


def test_truncation_drops_the_images_whose_token_was_cut():
    tok = WordTokenizer("intro a red circle . blue square", max_length=6)
    b = interleaved_batch(["<image> a red circle . <image> blue"], [[_img(1), _img(2)]], ["d"], tok)
    assert b["text_ids"].tolist() == [[1, 3, 6, 7, 8, 9]]  # the second <image> was cut
    assert b["num_images"].tolist() == [1] and b["images"].shape[1] == 1
    assert b["lm_labels"].tolist() == [[I, 6, 7, 8, 9, I]]


def test_lm_labels_of_a_row_without_images_are_all_ignored():
    ids = torch.tensor([[1, 5, 6, 2]])
    labels = lm_labels(ids, torch.ones_like(ids), torch.zeros_like(ids, dtype=torch.bool))
    assert labels.tolist() == [[I, I, I, I]]


def test_marks_and_images_must_match_naming_the_sample():
    with pytest.raises(DataError, match=r"doc7: 2 <image> mark\(s\) but 1 image\(s\)"):
        interleaved_batch(["<image> a <image> b"], [[_img(1)]], ["doc7"], TOK)
    with pytest.raises(DataError, match=r"doc8: 1 <image> mark\(s\) but 2 image\(s\)"):
        Collator("interleaved", TOK)([{"text": "<image> a", "images": [_img(1), _img(2)], "key": "doc8"}])


def test_a_tokenizer_without_media_tokens_is_a_config_error():
    with pytest.raises(ConfigError, match=r"special_tokens: \['<image>', '<\|endofchunk\|>'\]"):
        interleaved_batch(["<image> a"], [[_img(1)]], ["d"], HFTokenizer(MINILM))


def test_shards_round_trip_and_mismatched_documents_are_counted_skips(tmp_path):
    samples = []
    for i in range(5):
        k = 1 + i % 2
        s = {"__key__": f"doc{i}", "json": {"text": " ".join(f"<image> picture {j}." for j in range(k))}}
        for j in range(k):
            s[f"{j}.jpg"] = jpeg_bytes((40 * i, 80, 160))
        samples.append(s)
    samples.append({"__key__": "bad", "json": {"text": "<image> one <image> two"}, "0.jpg": jpeg_bytes()})
    url = write_tar(tmp_path / "docs.tar", samples)
    Manifest(name="docs", modality="interleaved", splits={"test": Split(urls=url, num_samples=6)}).save(
        tmp_path / "docs.yaml"
    )
    tok = HFTokenizer(MINILM, max_length=32, special_tokens=["<image>", "<|endofchunk|>"])
    dm = WebDataModule(
        test=[Source(str(tmp_path / "docs.yaml"), split="test")],
        tokenizer=tok,
        image_size=16,
        batch_size=8,
        num_workers=0,
        max_skip_fraction=0.5,
    )
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    (skip,) = batch["skipped"]  # counted and logged by key, like any bad sample
    assert skip.key.endswith("docs.tar:bad") and "2 <image> mark(s) but 1 image(s)" in skip.reason
    batch = dm.on_before_batch_transfer(batch, 0)
    assert batch["num_skipped"] == 1
    media_id, eoc = tok.token_id("<image>"), tok.token_id("<|endofchunk|>")
    ids = batch["text_ids"]
    assert torch.equal(batch["media_mask"], ids == media_id)
    assert batch["num_images"].tolist() == [1, 2, 1, 2, 1]
    assert ((ids == eoc).sum(1) == batch["num_images"]).all()  # one end-of-chunk per image
    assert batch["images"].shape == (5, 2, 3, 16, 16) and batch["images_mask"].sum() == 7
    real = batch["lm_labels"] != -100
    assert torch.equal(batch["lm_labels"][:, :-1][real[:, :-1]], ids[:, 1:][real[:, :-1]])
    assert not (batch["lm_labels"] == media_id).any()
    batch = dm.finish_batch(batch)
    assert batch["images"].dtype == torch.float32 and batch["images"][0, 1].abs().sum() == 0


def test_a_causal_lm_tokenizer_without_padding_token_pads_with_eos(tmp_path):
    """GPT-2-style: no pad token, no tokens added around the text; labels computed by hand."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Backend(models.WordLevel({"<unk>": 0, "</s>": 1, "a": 2, "red": 3, "circle": 4}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>").save_pretrained(tmp_path)
    tok = HFTokenizer(str(tmp_path), special_tokens=["<image>", "<|endofchunk|>"])
    assert tok.pad_token_id == 1 and tok.vocab_size == 7  # <image> 5, <|endofchunk|> 6
    b = interleaved_batch(["<image> a red circle", "a <image> red"], [[_img(1)], [_img(2)]], ["d0", "d1"], tok)
    assert b["text_ids"].tolist() == [[5, 2, 3, 4, 6], [2, 5, 3, 6, 1]]
    assert b["text_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert b["lm_labels"].tolist() == [[2, 3, 4, 6, I], [I, 3, 6, I, I]]
