"""Image-text matching with hard negatives (ALBEF), usable by every fusion model (METER's
ITM is the same head on its pooled streams)."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from vlp.objectives.base import Objective, find_objective
from vlp.objectives.itc import ITC
from vlp.objectives.momentum_itc import text_hash

log = logging.getLogger("vlp")


def sample_negatives(weights: torch.Tensor, forbidden: torch.Tensor, generator: torch.Generator | None = None):
    """One column per row, drawn with probability ∝ ``weights`` among allowed columns.

    ``forbidden`` (B, B) bool marks columns that are not negatives (the pair itself and
    pairs sharing an image id). A row with no allowed weight falls back to uniform over
    its allowed columns; a row with no allowed column at all raises. Non-finite weights
    (a model gone NaN) count as 0, so that the step reaches the loss, whose non-finite
    value the module reports by step and objective.
    """
    w = weights.float().masked_fill(forbidden, 0.0)  # (B, B)
    w = torch.where(torch.isfinite(w) & (w > 0), w, torch.zeros_like(w))
    empty = w.sum(1) <= 0
    if empty.any():
        uniform = (~forbidden).float()
        if (uniform[empty].sum(1) == 0).any():
            raise ValueError("ITM: a sample has no negative in its batch (every pair shares its image id)")
        w = torch.where(empty[:, None], uniform, w)
    return torch.multinomial(w, 1, generator=generator).squeeze(1)  # (B,)


class ITM(Objective):
    """Image-text matching: a binary head on the match features of matched pairs and of
    negatives, one negative image per text and one negative text per image.

    The model provides ``match_features(text_tokens, text_mask, image_tokens) → (N, dim)``
    (ALBEF: the fused CLS token; METER: both streams' pooled first tokens, concatenated)
    and puts those of the matched pairs in ``output.fused_cls``.

    Negatives are "hard" (ALBEF): drawn per sample with probability softmax(ITC similarity)
    within the batch, never the pair itself nor a pair sharing its ``image_id``; with
    ``hard_negatives=False`` they are drawn uniformly (the paper's ITM row without hard
    negatives). Labels: 1 for the B matched pairs, 0 for the 2B negatives.

    Args:
        dim: width of the match features (default: the model's).
        hard_negatives: sample by ITC similarity (True; needs a model with ITC features:
            METER only has them with an ITC objective) or uniformly.
        temperature: used for the sampling softmax when the model has no ITC objective
            (ALBEF's projections then get no training signal: a warning says so).
        exclude_same_text: never use a caption identical to the positive one as a negative
            (it would be a false negative; matters for templated captions).
        pooler: put BERT's pooler (Linear → tanh) before the binary layer (FLAVA's ITM head).
    """

    default_name = "itm"
    #: ``score`` reads the model's match features (so evaluation may fuse pairs through the
    #: fusion's caches); False for scorers that decode (GenerativeITM).
    scores_fused_features = True
    requires = ("text_tokens", "text_mask", "image_tokens", "fused_cls", "image_embeds", "text_embeds")
    requires_batch = ("image_id",)

    def __init__(
        self,
        weight: float = 1.0,
        *,
        name: str | None = None,
        modalities: list[str] | None = None,
        dim: int | None = None,
        hard_negatives: bool = True,
        temperature: float = 0.07,
        exclude_same_text: bool = True,
        pooler: bool = False,
    ):
        super().__init__(weight, name=name, modalities=modalities)
        self.exclude_same_text = exclude_same_text
        self.pooler = pooler
        self.head = self.make_head(dim) if dim is not None else None
        self.hard_negatives = hard_negatives
        self.temperature = temperature

    def needs(self) -> dict[str, str]:
        needs = {"fusion": "to fuse (text, image) pairs"}
        if self.hard_negatives:
            needs["contrastive"] = (
                f"to sample hard negatives by ITC similarity (or set {type(self).__name__}(hard_negatives: false))"
            )
        return needs

    def setup(self, model: nn.Module) -> None:
        self.build_head(model)
        if self.hard_negatives and find_objective(model, ITC) is None:
            log.warning(
                "%s (%s): hard negatives come from the similarities of ITC projections that no ITC objective "
                "trains; add an ITC objective or set hard_negatives: false",
                type(self).__name__,
                self.name,
            )

    def build_head(self, model: nn.Module) -> None:
        """The binary head on the model's match features (its width read from the model)."""
        given = None if self.head is None else next(self.head.parameters()).shape[1]
        dim = self.width_of("dim", given, model, "match")
        if self.head is None:
            self.head = self.make_head(dim)

    def make_head(self, dim: int) -> nn.Module:
        """Linear(dim, 2), with ``pooler`` after a Linear(dim, dim) → tanh."""
        binary = nn.Linear(dim, 2)
        return nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), binary) if self.pooler else binary

    def negatives(self, output, batch: dict, model) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices (B,) of the negative image for each text and the negative text for each image."""
        ids = batch["image_id"].view(-1)  # (B,)
        forbidden = ids[:, None] == ids[None, :]  # (B, B), includes the diagonal
        if self.exclude_same_text:
            h = text_hash(batch["text_ids"], batch["text_mask"])  # (B,)
            forbidden = forbidden | (h[:, None] == h[None, :])
        with torch.no_grad():
            if self.hard_negatives:
                itc = find_objective(model, ITC)
                scale = itc.scale() if itc is not None else torch.tensor(1 / self.temperature)
                image_m = output.image_embeds_m if output.image_embeds_m is not None else output.image_embeds
                text_m = output.text_embeds_m if output.text_embeds_m is not None else output.text_embeds
                w_t2i = F.softmax(scale * output.text_embeds @ image_m.T, dim=1)  # (B, B)
                w_i2t = F.softmax(scale * output.image_embeds @ text_m.T, dim=1)  # (B, B)
            else:
                w_t2i = w_i2t = torch.ones(len(ids), len(ids), device=ids.device)
            neg_image = sample_negatives(w_t2i, forbidden)  # (B,) for each text
            neg_text = sample_negatives(w_i2t, forbidden)  # (B,) for each image
        return neg_image, neg_text

    def forward(self, output, batch: dict, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        neg_image, neg_text = self.negatives(output, batch, model)
        text, mask, image = output.text_tokens, output.text_mask, output.image_tokens
        # negatives: (text b, image neg_image[b]) then (text neg_text[b], image b)
        neg_text_tokens = torch.cat([text, text[neg_text]])  # (2B, L, D)
        neg_text_mask = torch.cat([mask, mask[neg_text]])  # (2B, L)
        neg_image_tokens = torch.cat([image[neg_image], image])  # (2B, Li, Dv)
        fused_neg = model.match_features(neg_text_tokens, neg_text_mask, neg_image_tokens)  # (2B, D)
        cls = torch.cat([output.fused_cls, fused_neg])  # (3B, D)
        logits = self.head(cls)  # (3B, 2)
        B = text.shape[0]
        labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(logits.device)  # (3B,)
        loss = F.cross_entropy(logits, labels)
        with torch.no_grad():
            acc = (logits.argmax(1) == labels).float().mean()
        return self.named(loss=loss, acc=acc)

    def score(self, fused_cls: torch.Tensor) -> torch.Tensor:
        """Ranking score of fused CLS tokens (N, D) → (N,): the "match" logit, as ALBEF ranks."""
        return self.head(fused_cls)[:, 1]

    def is_match(self, fused_cls: torch.Tensor) -> torch.Tensor:
        """The head's decision (N,) bool: "match" logit above "no match"."""
        logits = self.head(fused_cls)  # (N, 2)
        return logits[:, 1] > logits[:, 0]

    def score_pairs(self, model, text_tokens, text_mask, image_tokens) -> torch.Tensor:
        """Ranking score (N,) of (text, image) pairs through ``model``'s fusion."""
        return self.score(model.match_features(text_tokens, text_mask, image_tokens))

    def is_match_pairs(self, model, text_tokens, text_mask, image_tokens) -> torch.Tensor:
        """Match decision (N,) bool of (text, image) pairs through ``model``'s fusion."""
        return self.is_match(model.match_features(text_tokens, text_mask, image_tokens))
