"""Special tokens in the tokenizer and the text model's embedding table growing to match."""

from __future__ import annotations

import pickle

import pytest
import torch
from helpers import MINILM, tiny_bert

from vlp.data import HFTokenizer
from vlp.encoders.text import HFCausalLM, resize_token_embeddings
from vlp.errors import ConfigError

MEDIA = ["<image>", "<|endofchunk|>"]


def test_special_tokens_are_single_ids_and_counted():
    tok = HFTokenizer(MINILM, max_length=32)
    base = tok.vocab_size
    ids = tok.add_special_tokens(MEDIA)
    assert ids == [base, base + 1] and tok.vocab_size == base + 2
    assert tok.add_special_tokens(["<image>"]) == [base]  # known tokens keep their id
    enc = tok(["<image> a red circle<|endofchunk|><image>"])["input_ids"][0].tolist()
    assert enc.count(base) == 2 and enc.count(base + 1) == 1
    assert enc[1] == base and enc[-2] == base  # [CLS] <image> ... <image> [SEP]
    special = tok.special_tokens_mask(torch.tensor([enc]))[0]
    assert special[1] and special[-2]  # MLM never masks media tokens
    # the constructor argument and a pickled copy (DataLoader workers) agree
    same = HFTokenizer(MINILM, max_length=32, special_tokens=MEDIA)
    copy = pickle.loads(pickle.dumps(tok))
    for other in (same, copy):
        assert other.vocab_size == base + 2
        assert other.token_id("<|endofchunk|>") == base + 1


def test_bad_special_tokens_are_refused():
    with pytest.raises(ConfigError, match="special_tokens must be a list"):
        HFTokenizer(MINILM, special_tokens="<image>")
    with pytest.raises(ConfigError, match="has no token '<image>'"):
        HFTokenizer(MINILM).token_id("<image>")


def test_resize_token_embeddings_keeps_old_rows_and_embeds_new_ids():
    torch.manual_seed(0)
    enc = tiny_bert(50, 16)
    old = enc.model.get_input_embeddings().weight.detach().clone()
    assert resize_token_embeddings(enc, 53) is enc
    table = enc.model.get_input_embeddings().weight
    assert enc.vocab_size == 53
    torch.testing.assert_close(table[:50], old)
    torch.testing.assert_close(table[50:], old.mean(0).expand(3, -1))
    ids = torch.tensor([[1, 50, 52, 2]])
    out = enc(ids, torch.ones_like(ids))
    assert out.tokens.shape == (1, 4, 16) and torch.isfinite(out.tokens).all()
    resize_token_embeddings(enc, 53)  # already that large: unchanged
    assert enc.vocab_size == 53
    with pytest.raises(ConfigError, match="vocab_size must be an integer >= 53"):
        resize_token_embeddings(enc, 10)


@pytest.mark.parametrize("tied", [True, False])
def test_resize_grows_the_lm_head(tied):
    torch.manual_seed(0)
    config = dict(model_type="gpt2", vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    lm = HFCausalLM(config={**config, "tie_word_embeddings": tied})
    head = lm.model.get_output_embeddings().weight.detach().clone()
    resize_token_embeddings(lm, 42)
    grown = lm.model.get_output_embeddings().weight
    assert grown.shape == (42, 16)
    torch.testing.assert_close(grown[:40], head)
    torch.testing.assert_close(grown[40:], head.mean(0).expand(2, -1))
    assert (grown is lm.model.get_input_embeddings().weight) == tied
    logits = lm.logits(lm(torch.tensor([[0, 41]])).tokens)
    assert logits.shape == (1, 2, 42)


def test_resize_of_a_bare_llama_grows_its_head_too():
    """A bare PreTrainedModel whose backbone is its ``.model`` (Llama) is resized whole."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        tie_word_embeddings=False,
    )
    lm = AutoModelForCausalLM.from_config(config)
    resize_token_embeddings(lm, 42)
    assert lm.get_input_embeddings().weight.shape[0] == 42
    assert lm.get_output_embeddings().weight.shape[0] == 42


def test_datamodule_vocab_size_counts_added_tokens():
    from vlp.data import WebDataModule

    tok = HFTokenizer(MINILM, special_tokens=MEDIA)
    assert WebDataModule(tokenizer=tok).vocab_size == tok.vocab_size == 30524
    with pytest.raises(ConfigError, match="tokenizer is not set"):
        WebDataModule().vocab_size  # noqa: B018
