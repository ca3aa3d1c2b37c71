"""Objectives of encoder-decoder models: tasks cast as text generation.

METER's encoder-only vs encoder-decoder study (after VL-T5) puts a text decoder on top of
the fusion encoder and makes every objective a generation target; ALBEF answers VQA with a
decoder of the same shape. In vlp the decoder is a model part (``decoder:
vlp.blocks.TextDecoder`` in the recipe) and the model provides

    decoder_context(text_tokens, text_mask, image_tokens) → (context (N, S, D), mask (N, S))

(METER: both fused streams concatenated; ALBEF: the fused text tokens). The objectives:

* :class:`DenoisingLM` — MLM as generation: the encoder reads the masked caption and the
  image, the decoder writes the whole caption (teacher-forced cross-entropy).
* :class:`GenerativeITM` — ITM as generation: the decoder writes "true" for a matched pair
  and "false" for a negative (negatives drawn as :class:`~vlp.objectives.ITM` draws them);
  its match score is ``log p(true) - log p(false)`` at the first decoded position, so
  retrieval ranking and ITM evaluation work unchanged.
* :class:`GenerativeVQA` — VQA as generation: the decoder writes the most frequent human
  answer; evaluation decodes greedily and scores the strings with the official VQA accuracy
  (open-ended: no answer vocabulary).

Each takes the data's ``tokenizer`` (the same ``class_path``/``init_args`` as
``data.tokenizer``) to encode targets and decode outputs; its start and end tokens are the
decoder's.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from vlp.data.tokenization import Tokenizer
from vlp.errors import ConfigError
from vlp.eval.vqa import normalize_answer
from vlp.objectives.base import Objective
from vlp.objectives.itm import ITM
from vlp.objectives.tasks import VQA, load_answer_vocab


def model_decoder(model: nn.Module, objective: Objective) -> nn.Module:
    """The model's text decoder, or a ConfigError naming the objective that needs one."""
    decoder = getattr(model, "decoder", None)
    if decoder is None:
        raise ConfigError(
            f"objective {type(objective).__name__} ({objective.name}) generates text and needs a decoder: "
            f"set model.decoder (vlp.blocks.TextDecoder) in the recipe"
        )
    return decoder


def encode_targets(tokenizer: Tokenizer, texts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and mask (N, L) of target texts, each ``start ... end``."""
    enc = tokenizer(texts)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device).bool()


def token_accuracy(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Share of target tokens (after the start token) predicted by the teacher-forced ``logits``."""
    real = mask[:, 1:].bool()
    return (logits.argmax(-1) == ids[:, 1:])[real].float().mean()


class GenerativeObjective(Objective):
    """Base of the generation objectives: holds the tokenizer and checks the model's decoder."""

    def __init__(
        self,
        weight: float = 1.0,
        *,
        tokenizer: Tokenizer,
        name: str | None = None,
        modalities: list[str] | None = None,
    ) -> None:
        super().__init__(weight, name=name, modalities=modalities)
        self.tokenizer = tokenizer

    def needs(self) -> dict[str, str]:
        return {"decoder": "to generate text (set model.decoder: vlp.blocks.TextDecoder)"}

    def setup(self, model: nn.Module) -> None:
        self.check_decoder(model.decoder)

    def check_decoder(self, decoder: nn.Module) -> None:
        """ConfigError unless ``decoder`` can write every token of the tokenizer."""
        vocab = self.tokenizer.vocab_size
        if decoder.vocab_size < vocab:
            raise ConfigError(
                f"objective {type(self).__name__}: the decoder's vocab_size {decoder.vocab_size} is smaller "
                f"than its tokenizer's ({vocab})"
            )

    def check_data(self, model: nn.Module, tokenizer, image_size: int | None) -> None:
        """ConfigError unless the data's tokenizer is this objective's (the decoder reads the
        data's token ids and writes this tokenizer's)."""
        ours = self.tokenizer.vocab_size
        if tokenizer is not None and tokenizer.vocab_size != ours:
            raise ConfigError(
                f"data.tokenizer has {tokenizer.vocab_size} tokens but objective {type(self).__name__} "
                f"({self.name})'s tokenizer has {ours}: give both the same tokenizer"
            )


class DenoisingLM(GenerativeObjective):
    """MLM as generation: the decoder reconstructs the caption from the encoding of its masked
    version and the image. Needs ``data.maskers: [vlp.data.MLMMasker]``. Logs the token
    accuracy of the reconstruction (``dlm_acc``)."""

    default_name = "dlm"
    requires = ("image_tokens",)
    requires_batch = ("mlm_input_ids", "text_ids", "text_mask")

    def check_data(self, model: nn.Module, tokenizer, image_size: int | None) -> None:
        super().check_data(model, tokenizer, image_size)
        positions = getattr(getattr(model, "decoder", None), "max_length", None)
        length = getattr(tokenizer, "max_length", None)
        if positions is not None and length is not None and length - 1 > positions:  # it reads ids[:, :-1]
            raise ConfigError(
                f"data.tokenizer.max_length is {length} but model.decoder, which rewrites whole captions for "
                f"DenoisingLM ({self.name}), has max_length {positions}: set the decoder's max_length >= {length - 1}"
            )

    @staticmethod
    def _context(model: nn.Module, batch: dict, image_tokens: torch.Tensor):
        """The caption mask (B, Lt) and what the decoder reads: the encoding of the masked
        caption with the image → (mask, context, context mask)."""
        mask = batch["text_mask"].bool()
        masked_tokens, _ = model.embed_text(batch["mlm_input_ids"], mask)  # (B, Lt, D)
        return mask, *model.decoder_context(masked_tokens, mask, image_tokens)

    def forward(self, output, batch: dict, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        decoder = model_decoder(model, self)
        mask, context, context_mask = self._context(model, batch, output.image_tokens)
        loss, logits = decoder.loss(batch["text_ids"], mask, context, context_mask)  # logits (B, Lt-1, V)
        with torch.no_grad():
            acc = token_accuracy(logits, batch["text_ids"], mask)
        return self.named(loss=loss, acc=acc)

    @torch.no_grad()
    def masked_hits(self, model: nn.Module, batch: dict, image_tokens: torch.Tensor) -> tuple[float, int]:
        """Evaluation: teacher-forced predictions at the masked positions → (hits, count)."""
        decoder = model_decoder(model, self)
        mask, context, context_mask = self._context(model, batch, image_tokens)
        ids = batch["text_ids"]
        logits = decoder(ids[:, :-1], mask[:, :-1], context, context_mask)  # (B, Lt-1, V)
        masked = batch["mlm_labels"][:, 1:] != -100  # (B, Lt-1): position p predicts token p+1
        hits = logits.argmax(-1)[masked] == ids[:, 1:][masked]
        return float(hits.sum()), int(hits.numel())


class GenerativeITM(ITM):
    """ITM as generation: the decoder writes ``words[0]`` ("true") for the B matched pairs and
    ``words[1]`` ("false") for the 2B negatives of :meth:`ITM.negatives` (hard or uniform).
    Each word must be one token. ``itm_acc`` is the decision at the first decoded position.

    Args:
        tokenizer: the data's tokenizer.
        words: the match and no-match answers.
        hard_negatives / temperature / exclude_same_text: as :class:`~vlp.objectives.ITM`.
    """

    requires = ("text_tokens", "text_mask", "image_tokens", "image_embeds", "text_embeds")
    scores_fused_features = False  # the decoder scores pairs

    def __init__(
        self,
        weight: float = 1.0,
        *,
        tokenizer: Tokenizer,
        name: str | None = None,
        modalities: list[str] | None = None,
        words: tuple[str, str] = ("true", "false"),
        hard_negatives: bool = False,
        temperature: float = 0.07,
        exclude_same_text: bool = True,
    ) -> None:
        super().__init__(
            weight,
            name=name,
            modalities=modalities,
            hard_negatives=hard_negatives,
            temperature=temperature,
            exclude_same_text=exclude_same_text,
        )  # no head: the decoder answers
        self.tokenizer = tokenizer
        self.words = tuple(words)
        ids, mask = encode_targets(tokenizer, list(self.words), torch.device("cpu"))
        if mask.sum(1).tolist() != [3, 3]:
            raise ConfigError(f"GenerativeITM: each of {self.words} must be a single token of the tokenizer")
        self.register_buffer("targets", ids, persistent=False)  # (2, 3): start, word, end
        self.match_id, self.no_match_id = int(ids[0, 1]), int(ids[1, 1])

    check_decoder = GenerativeObjective.check_decoder
    check_data = GenerativeObjective.check_data
    setup = GenerativeObjective.setup

    def needs(self) -> dict[str, str]:
        needs = GenerativeObjective.needs(self)
        if self.hard_negatives:
            needs["contrastive"] = "to sample hard negatives by ITC similarity (or set hard_negatives: false)"
        return needs

    def forward(self, output, batch: dict, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        decoder = model_decoder(model, self)
        neg_image, neg_text = self.negatives(output, batch, model)
        text, mask, image = output.text_tokens, output.text_mask, output.image_tokens
        B = text.shape[0]
        texts = torch.cat([text, text, text[neg_text]])  # (3B, Lt, D): positives, then negatives
        masks = torch.cat([mask, mask, mask[neg_text]])
        images = torch.cat([image, image[neg_image], image])  # (3B, Li, D)
        context, context_mask = model.decoder_context(texts, masks, images)
        label = torch.cat([torch.zeros(B), torch.ones(2 * B)]).long().to(text.device)  # 0 "true", 1 "false"
        loss, logits = decoder.loss(self.targets[label], None, context, context_mask)  # logits (3B, 2, V)
        with torch.no_grad():
            acc = ((self._margin(logits[:, 0]) > 0) == (label == 0)).float().mean()
        return self.named(loss=loss, acc=acc)

    def _margin(self, first_logits: torch.Tensor) -> torch.Tensor:
        return first_logits[:, self.match_id] - first_logits[:, self.no_match_id]

    def score_pairs(self, model, text_tokens, text_mask, image_tokens) -> torch.Tensor:
        """``log p(true) - log p(false)`` (N,) of each (text, image) pair at the first position."""
        context, context_mask = model.decoder_context(text_tokens, text_mask, image_tokens)
        start = self.targets[:1, :1].expand(len(context), 1)  # (N, 1)
        return self._margin(model_decoder(model, self)(start, None, context, context_mask)[:, 0])

    def is_match_pairs(self, model, text_tokens, text_mask, image_tokens) -> torch.Tensor:
        return self.score_pairs(model, text_tokens, text_mask, image_tokens) > 0

    def score(self, fused_cls: torch.Tensor) -> torch.Tensor:
        raise ConfigError("GenerativeITM scores pairs with the decoder: use score_pairs(model, ...)")

    is_match = score


class GenerativeVQA(VQA):
    """VQA as generation: the decoder writes the most frequent normalised human answer
    (teacher-forced cross-entropy). Evaluation, open-ended: greedy decoding up to
    ``max_answer_tokens``; with an ``answers`` list (ALBEF's protocol): the ``k`` candidates
    with the likeliest first token are ranked by the decoder's log-likelihood of the whole
    answer. Either way the answers are scored with the official VQA accuracy by question type.

    Args:
        tokenizer: the data's tokenizer.
        max_answer_tokens: longest decoded answer.
        answers: candidate answers to rank instead of decoding freely (a list or a file,
            see :func:`~vlp.objectives.tasks.load_answer_vocab`).
        k: candidates ranked per question (ALBEF: 128); None ranks them all.
        question_types / baseline: as :class:`~vlp.objectives.VQA`.
    """

    requires = ("text_tokens", "text_mask", "image_tokens")

    def __init__(
        self,
        weight: float = 1.0,
        *,
        tokenizer: Tokenizer,
        name: str | None = None,
        modalities: list[str] | None = None,
        max_answer_tokens: int = 8,
        answers: list[str] | str | None = None,
        k: int | None = 128,
        question_types: list[str] | None = None,
        baseline: dict[str, float] | None = None,
    ) -> None:
        Objective.__init__(self, weight, name=name, modalities=modalities)  # no classifier
        self.tokenizer = tokenizer
        self.max_answer_tokens = max_answer_tokens
        self.question_types = question_types
        self.baseline = baseline
        self.start_id, self.end_id = tokenizer.start_end_ids
        self.answers = load_answer_vocab(answers) if answers is not None else None
        self.k = k
        if self.answers is not None:
            ids, mask = encode_targets(tokenizer, self.answers, torch.device("cpu"))
            self.register_buffer("answer_ids", ids, persistent=False)  # (A, La)
            self.register_buffer("answer_mask", mask, persistent=False)

    check_decoder = GenerativeObjective.check_decoder
    check_data = GenerativeObjective.check_data
    needs = GenerativeObjective.needs
    setup = GenerativeObjective.setup  # no classifier head to size

    @staticmethod
    def target_answer(answers: list[str]) -> str:
        """The most frequent normalised answer (the first one among equals)."""
        counts = Counter(a for a in (normalize_answer(x) for x in answers) if a)
        if not counts:
            raise ValueError(f"a VQA question has no non-empty answer: {answers!r}")
        return counts.most_common(1)[0][0]

    def _context(self, output, model):
        return model.decoder_context(output.text_tokens, output.text_mask, output.image_tokens)

    def forward(self, output, batch: dict, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        decoder = model_decoder(model, self)
        context, context_mask = self._context(output, model)
        ids, mask = encode_targets(self.tokenizer, [self.target_answer(a) for a in batch["answers"]], context.device)
        loss, logits = decoder.loss(ids, mask, context, context_mask)  # logits (B, La-1, V)
        with torch.no_grad():
            acc = token_accuracy(logits, ids, mask)
        return self.named(loss=loss, token_acc=acc)

    @torch.no_grad()
    def answer(self, output, model) -> list[str]:
        """One answer per question of the batch: greedy, or ranked from ``answers``."""
        context, context_mask = self._context(output, model)
        if self.answers is not None:
            return [self.answers[i] for i in self.rank(context, context_mask, model).tolist()]
        ids = model_decoder(model, self).generate(
            context,
            context_mask,
            bos_token_id=self.start_id,
            eos_token_id=self.end_id,
            pad_token_id=self.tokenizer.pad_token_id,
            max_new_tokens=self.max_answer_tokens + 1,
        )
        return [normalize_answer(a) for a in self.tokenizer.decode(ids)]

    @torch.no_grad()
    def rank(self, context: torch.Tensor, context_mask: torch.Tensor | None, model) -> torch.Tensor:
        """Index (B,) of the likeliest candidate answer of each question: the top ``k`` by
        first-token log-probability, re-scored by the log-likelihood of the whole answer."""
        decoder = model_decoder(model, self)
        B, A = len(context), len(self.answers)
        start = self.answer_ids[:, :1][:1].expand(B, 1)  # (B, 1)
        first = decoder(start, None, context, context_mask)[:, 0].log_softmax(-1)  # (B, V)
        k = A if self.k is None else min(self.k, A)
        top = first[:, self.answer_ids[:, 1]].topk(k, dim=1).indices  # (B, k)
        rows = torch.arange(B, device=context.device).repeat_interleave(k)  # (B k,)
        ctx_mask = context_mask[rows] if context_mask is not None else None
        ids, mask = self.answer_ids[top.flatten()], self.answer_mask[top.flatten()]  # (B k, La)
        score = decoder.sequence_logprob(ids, mask, context[rows], ctx_mask).view(B, k)
        return top.gather(1, score.argmax(1, keepdim=True)).squeeze(1)

    @torch.no_grad()
    def evaluate(self, metric, output, batch: dict, model=None) -> None:
        metric.update(self.answer(output, model), batch["answers"], batch.get("question_type"))
