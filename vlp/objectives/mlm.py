"""Masked language modelling conditioned on the image through the fusion (ALBEF, METER),
with optional momentum distillation of the targets (ALBEF)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlp.errors import ConfigError
from vlp.objectives.base import Objective
from vlp.objectives.momentum_itc import soft_cross_entropy


class MLMHead(nn.Module):
    """BERT's prediction head: dense → GELU → LayerNorm → decoder + bias. The decoder is the
    word-embedding matrix passed to ``forward`` (tied, BERT/ALBEF) or, with ``tied=False``,
    its own (vocab, dim) matrix (ViLT/METER)."""

    def __init__(self, dim: int, vocab_size: int, norm_eps: float = 1e-12, tied: bool = True) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.decoder = None if tied else nn.Parameter(torch.empty(vocab_size, dim).normal_(std=0.02))
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: torch.Tensor, word_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm(F.gelu(self.dense(hidden)))  # (..., D)
        weight = self.decoder if self.decoder is not None else word_embeddings  # (V, D)
        return h @ weight.T + self.bias  # (..., V)


class MLM(Objective):
    """Masked language modelling conditioned on the image through the fusion layers, with
    momentum distillation of the targets: ``(1 - alpha) * CE(labels) + alpha * CE(softmax(momentum logits))``
    over the masked positions. Needs ``data.maskers: [vlp.data.MLMMasker]``.

    The model provides ``mlm_hidden(input_ids, mask, image_tokens) → (B, L, dim)`` (the text
    stream after fusion) and, for a tied decoder, ``word_embeddings() → (V, dim)``. A model
    that computes the masked text's states in its forward puts them in ``output.mlm_hidden``
    (FLAVA: the text tower's on ``text`` batches, the multimodal encoder's on pairs), read
    instead of a second pass.

    Args:
        dim / vocab_size: text width and vocabulary (default: the model's fused text width and
            the rows of its word embeddings).
        distill: use the momentum model's predictions (needs the model's momentum copies).
        tie_weights: decode with the text encoder's word embeddings (BERT, ALBEF) or with a
            matrix of the head's own (METER, ViLT; needed when the fused width differs from
            the embedding width).
    """

    default_name = "mlm"
    requires = ("image_tokens",)
    requires_batch = ("mlm_input_ids", "mlm_labels", "text_mask")

    def __init__(
        self,
        weight: float = 1.0,
        *,
        name: str | None = None,
        modalities: list[str] | None = None,
        dim: int | None = None,
        vocab_size: int | None = None,
        distill: bool = True,
        tie_weights: bool = True,
    ):
        super().__init__(weight, name=name, modalities=modalities)
        self.distill = distill
        self.tie_weights = tie_weights
        self.head = self.head_m = None  # the momentum copy exists only to distil
        self.dim, self.vocab_size = dim, vocab_size  # either may be given alone; setup reads the rest
        if dim is not None and vocab_size is not None:
            self._make_heads(dim, vocab_size)

    def _make_heads(self, dim: int, vocab_size: int) -> None:
        self.head = MLMHead(dim, vocab_size, tied=self.tie_weights)
        if self.distill:
            self.head_m = MLMHead(dim, vocab_size, tied=self.tie_weights)
            self.head_m.load_state_dict(self.head.state_dict())
            self.head_m.requires_grad_(False)

    def needs(self) -> dict[str, str]:
        needs = {"masked_lm": "to predict masked tokens through the fusion"}
        if self.distill:
            needs["momentum"] = "to distil from the momentum model's predictions (or set MLM(distill: false))"
        return needs

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.head, self.head_m)] if self.head_m is not None else []

    def setup(self, model: nn.Module) -> None:
        given = self.head is not None
        dim = self.width_of("dim", self.head.dense.in_features if given else self.dim, model, "mlm")
        vocab = self.width_of("vocab_size", self.head.bias.numel() if given else self.vocab_size, model, "vocab")
        if not given:
            self._make_heads(dim, vocab)
        if self.head.decoder is not None:
            return
        rows, width = model.word_embeddings().shape  # (V, Dt): the tied decoder
        if width != dim:
            raise ConfigError(
                f"MLM ({self.name}) with tie_weights: true decodes with the word embeddings (width {width}), "
                f"but its dim is {dim}: use MLM(tie_weights: false)"
            )

    def check_data(self, model: nn.Module, tokenizer, image_size: int | None) -> None:
        vocab = self.head.bias.numel()
        if tokenizer is not None and tokenizer.vocab_size > vocab:
            raise ConfigError(
                f"data.tokenizer has {tokenizer.vocab_size} tokens but objective MLM ({self.name}) predicts "
                f"vocab_size {vocab}: set MLM(vocab_size: {tokenizer.vocab_size})"
            )

    def forward(self, output, batch: dict, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        ids, labels, mask = batch["mlm_input_ids"], batch["mlm_labels"], batch["text_mask"]
        hidden = getattr(output, "mlm_hidden", None)  # a view the model computed already (FLAVA)
        if hidden is None:
            hidden = model.mlm_hidden(ids, mask, output.image_tokens)  # (B, L, D)
        target = labels != -100  # (B, L)
        tied = self.head.decoder is None
        logits = self.head(hidden[target], model.word_embeddings() if tied else None)  # (M, V)
        loss = F.cross_entropy(logits, labels[target]) if target.any() else logits.sum() * 0
        alpha = float(model.distill_alpha) if self.distill else 0.0
        if alpha > 0 and target.any():
            with torch.no_grad():
                hidden_m = model.mlm_hidden(ids, mask, output.image_tokens_m, momentum=True)  # (B, L, D)
                emb_m = model.word_embeddings(momentum=True) if tied else None
                soft = F.softmax(self.head_m(hidden_m[target], emb_m), dim=-1)
            loss = (1 - alpha) * loss + alpha * soft_cross_entropy(logits, soft)
        with torch.no_grad():
            acc = (logits.argmax(-1) == labels[target]).float().mean() if target.any() else logits.new_zeros(())
        return self.named(loss=loss, acc=acc)
