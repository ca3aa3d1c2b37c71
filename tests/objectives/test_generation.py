"""The encoder-decoder variant: TextDecoder (causality, masks, loss and log-probabilities by
hand, greedy decoding), the generation objectives on METER and ALBEF (gradients, hand-computed
ITM margin, VQA answers learned and scored), and the errors a wrong recipe gets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.models.test_albef import tiny_albef
from tests.models.test_meter import B, D, L, V, batch, step_reaches_every_parameter, task_batches, tiny_meter
from vlp.blocks import TextDecoder
from vlp.data.tokenization import HFTokenizer, OpenCLIPTokenizer, Tokenizer
from vlp.errors import ConfigError
from vlp.objectives import ITM, DenoisingLM, GenerativeITM, GenerativeVQA, Retrieval


class WordTokenizer(Tokenizer):
    """Whitespace words → ids: 0 pad, 1 start, 2 end, then ``words`` in order."""

    def __init__(self, words: list[str], max_length: int = 8) -> None:
        self.words = ["[pad]", "[start]", "[end]", *words]
        self.index = {w: i for i, w in enumerate(self.words)}
        self.max_length = max_length

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        rows = [[1, *(self.index[w] for w in t.split()), 2][: self.max_length] for t in texts]
        width = max(map(len, rows))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    def decode(self, ids: torch.Tensor) -> list[str]:
        return [" ".join(self.words[i] for i in row.tolist() if i > 2) for row in ids]


WORDS = ["true", "false", "yes", "no", "red", "blue", "two", "dogs"]


def decoder(vocab: int = V, context_dim: int = D, **kw) -> TextDecoder:
    torch.manual_seed(0)
    return TextDecoder(vocab, dim=D, depth=2, num_heads=2, context_dim=context_dim, max_length=16, **kw)


def encdec_meter(objectives, **kw):
    return tiny_meter(objectives=objectives, decoder=decoder(), **kw)


# -- the block ---------------------------------------------------------------------------


def test_decoder_shapes_causality_and_context_mask():
    dec = decoder(context_dim=24).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V, (2, 6), generator=g)
    ctx, ctx_mask = torch.randn(2, 5, 24, generator=g), torch.tensor([[1, 1, 1, 0, 0], [1] * 5]).bool()
    logits = dec(ids, None, ctx, ctx_mask)
    assert logits.shape == (2, 6, V)
    later = ids.clone()
    later[:, 4:] = 3
    assert torch.allclose(dec(later, None, ctx, ctx_mask)[:, :4], logits[:, :4], atol=1e-6)  # causal
    hidden = ctx.clone()
    hidden[0, 3:] = 100.0  # masked context tokens
    assert torch.allclose(dec(ids, None, hidden, ctx_mask), logits, atol=1e-6)
    assert not torch.allclose(dec(ids, None, hidden, None)[0], logits[0], atol=1e-3)


def test_decoder_loss_and_logprob_by_hand_and_every_parameter_gets_a_gradient():
    dec = decoder()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (3, 5), generator=g)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 3:] = False
    ctx = torch.randn(3, 4, D, generator=g)
    loss, logits = dec.loss(ids, mask, ctx)
    logp = dec(ids[:, :-1], mask[:, :-1], ctx).log_softmax(-1)
    terms = [-logp[b, t, ids[b, t + 1]] for b in range(3) for t in range(4) if mask[b, t + 1]]
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
    seq = [sum(logp[b, t, ids[b, t + 1]] for t in range(4) if mask[b, t + 1]) for b in range(3)]
    assert torch.allclose(dec.sequence_logprob(ids, mask, ctx), torch.stack(seq), atol=1e-5)
    loss.backward()
    missing = [n for n, p in dec.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing
    with pytest.raises(ValueError, match="longer than max_length=16"):
        dec(torch.zeros(1, 17, dtype=torch.long), None, ctx[:1])


def test_greedy_generation_learns_a_context_dependent_answer_and_stops_at_the_end_token():
    dec = decoder()
    ctx = torch.randn(2, 3, D, generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([[1, 7, 8, 2], [1, 9, 2, 0]])  # start, words, end, pad
    mask = targets != 0
    opt = torch.optim.AdamW(dec.parameters(), lr=3e-3)
    for _ in range(150):
        opt.zero_grad()
        dec.loss(targets, mask, ctx)[0].backward()
        opt.step()
    dec.eval()
    out = dec.generate(ctx, None, bos_token_id=1, eos_token_id=2, pad_token_id=0, max_new_tokens=6)
    assert out.tolist() == [[7, 8, 2], [9, 2, 0]]


# -- objectives on METER -------------------------------------------------------------------


@pytest.mark.parametrize("fusion", ["co", "merged"])
def test_encoder_decoder_meter_pretrains_with_every_parameter_getting_a_gradient(fusion):
    tok = WordTokenizer(WORDS)
    model = encdec_meter([DenoisingLM(tokenizer=tok), GenerativeITM(tokenizer=tok)], fusion=fusion)
    assert model.text_pooler is None  # generation needs no poolers
    step_reaches_every_parameter(model, batch())
    model.eval()
    model.evaluate([batch(1)], stage="val")
    assert set(model.results["val"]["scores"]) == {"itm_acc", "dlm_acc"}


def test_denoising_loss_is_the_caption_cross_entropy_given_the_masked_encoding():
    tok = WordTokenizer(WORDS)
    model = encdec_meter([DenoisingLM(tokenizer=tok)]).eval()
    b = batch()
    mask = b["text_mask"].bool()
    with torch.no_grad():
        out = model(b)
        got = model.objectives["dlm"](out, b, model)
        masked, _ = model.embed_text(b["mlm_input_ids"], mask)
        ctx, ctx_mask = model.decoder_context(masked, mask, out.image_tokens)
        assert ctx.shape == (B, L + out.image_tokens.shape[1], D) and ctx_mask[:, L:].all()
        logits = model.decoder(b["text_ids"][:, :-1], mask[:, :-1], ctx, ctx_mask)
        want = F.cross_entropy(logits[mask[:, 1:]], b["text_ids"][:, 1:][mask[:, 1:]])
    assert got["dlm_loss"].item() == pytest.approx(want.item(), rel=1e-5)


def test_generative_itm_margin_by_hand():
    tok = WordTokenizer(WORDS)
    itm = GenerativeITM(tokenizer=tok)
    model = encdec_meter([itm]).eval()
    b = batch()
    with torch.no_grad():
        out = model(b)
        score = itm.score_pairs(model, out.text_tokens, out.text_mask, out.image_tokens)
        ctx, ctx_mask = model.decoder_context(out.text_tokens, out.text_mask, out.image_tokens)
        logp = model.decoder(torch.ones(B, 1, dtype=torch.long), None, ctx, ctx_mask)[:, 0].log_softmax(-1)
    true, false = tok.index["true"], tok.index["false"]
    assert torch.allclose(score, logp[:, true] - logp[:, false], atol=1e-5)
    assert torch.equal(itm.is_match_pairs(model, out.text_tokens, out.text_mask, out.image_tokens), score > 0)
    with pytest.raises(ConfigError, match="single token"):
        GenerativeITM(tokenizer=tok, words=("true", "two dogs"))


def test_generative_itm_learns_and_retrieval_ranks_with_it():
    tok = WordTokenizer(WORDS)
    model = encdec_meter([GenerativeITM(tokenizer=tok), Retrieval(negatives=2, k=None)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    b = batch()
    first = None
    model.train()
    for _ in range(60):
        opt.zero_grad()
        out = model.training_step(b, 0)
        first = first if first is not None else out.item()
        out.backward()
        opt.step()
    assert out.item() < 0.4 * first
    model.eval()
    model._eval_batch("test", {**b, "modality": "retrieval"}, 0)
    model.on_test_epoch_end()
    scores = model.results["test"]["scores"]
    assert scores["i2t_r1"] > 25 and scores["t2i_r1"] > 25  # chance: 25 with 4 images


def test_recipe_errors_name_the_missing_or_mismatched_decoder():
    tok = WordTokenizer(WORDS)
    with pytest.raises(ConfigError, match=r"dlm \(DenoisingLM\) needs a model with 'decoder'.*set model.decoder"):
        tiny_meter(objectives=[DenoisingLM(tokenizer=tok)])
    with pytest.raises(ConfigError, match="cross-attends to width 24"):
        tiny_meter(objectives=[DenoisingLM(tokenizer=tok)], decoder=decoder(context_dim=24))
    with pytest.raises(ConfigError, match="vocab_size 5 is smaller"):
        tiny_meter(objectives=[DenoisingLM(tokenizer=tok)], decoder=decoder(vocab=5))
    model = encdec_meter([GenerativeITM(tokenizer=tok)])
    with pytest.raises(ConfigError, match="no poolers"):
        model.match_features(torch.zeros(1, 2, D), torch.ones(1, 2), torch.zeros(1, 3, D))


# -- VQA as generation, on METER and ALBEF ---------------------------------------------------


def test_target_answer_is_the_most_frequent_normalised_one():
    assert GenerativeVQA.target_answer(["Two", "2", "two.", "yes"]) == "2"  # "two" → "2"
    assert GenerativeVQA.target_answer(["red", "blue"]) == "red"
    with pytest.raises(ValueError, match="no non-empty answer"):
        GenerativeVQA.target_answer(["", " "])


@pytest.mark.parametrize("family", ["meter", "albef"])
def test_generative_vqa_learns_the_answers_and_scores_the_strings(family, capsys):
    tok = WordTokenizer(WORDS)
    vqa = GenerativeVQA(tokenizer=tok, question_types=["a"])
    if family == "meter":
        model = encdec_meter([vqa])
    else:
        model = tiny_albef(objectives=[vqa], use_momentum=False, decoder=decoder(context_dim=32))
    b = task_batches()["vqa"]
    b["answers"] = [["yes", "yes", "no"], ["no"], ["red"], ["blue dogs", "blue dogs", "blue"]]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(60):
        opt.zero_grad()
        model.training_step(b, 0).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out = model(b)
        assert vqa.answer(out, model) == ["yes", "no", "red", "blue dogs"]
        # ALBEF's protocol: rank a candidate list by the decoder's likelihood
        candidates = ["blue", "blue dogs", "dogs", "no", "red", "yes"]
        ranked = GenerativeVQA(tokenizer=tok, answers=candidates, k=2).answer(out, model)
        assert ranked == ["yes", "no", "red", "blue dogs"]
        full = GenerativeVQA(tokenizer=tok, answers=candidates, k=None)
        ctx, ctx_mask = model.decoder_context(out.text_tokens, out.text_mask, out.image_tokens)
        ids, mask = tok(candidates)["input_ids"], tok(candidates)["attention_mask"].bool()
        brute = torch.stack(
            [
                model.decoder.sequence_logprob(
                    ids, mask, ctx[i : i + 1].expand(6, -1, -1), ctx_mask[i : i + 1].expand(6, -1)
                )
                for i in range(B)
            ]
        )  # (B, 6)
        assert torch.equal(full.rank(ctx, ctx_mask, model), brute.argmax(1))
    model.test_step(b, 0)
    model.on_test_epoch_end()
    scores = model.results["test"]["scores"]
    # official accuracy, leave-one-out over the n answers of which k match the prediction:
    # (k min((k-1)/3, 1) + (n-k) min(k/3, 1)) / n → "yes" of 3 (k 2): (2/3 + 2/3) / 3 = 4/9; a single
    # answer is an exact match: 1, 1; "blue dogs": 4/9
    assert scores["overall"] == pytest.approx(100 * (4 / 9 + 1 + 1 + 4 / 9) / 4, abs=0.01)
    assert "vqa (" in capsys.readouterr().out


def test_real_tokenizers_give_start_and_end_ids_and_decode():
    from tests.helpers import MINILM

    hf = HFTokenizer(MINILM)
    assert hf.start_end_ids == (101, 102)  # [CLS], [SEP]
    assert hf.decode(hf(["A red circle", "yes"])["input_ids"]) == ["a red circle", "yes"]
    clip = OpenCLIPTokenizer()
    assert clip.decode(clip(["a red circle"])["input_ids"]) == ["a red circle"]
    itm = GenerativeITM(tokenizer=hf)  # "true" and "false" are single WordPiece tokens
    assert (itm.match_id, itm.no_match_id) == tuple(hf(["true", "false"])["input_ids"][:, 1].tolist())
    assert isinstance(itm, ITM) and itm.head is None
