"""ALBEF's objectives (Li et al., NeurIPS 2021): ITC with a momentum queue and
distillation, ITM with hard negatives, MLM conditioned on the image with distillation.

They read a :class:`~vlp.models.outputs.FusionOutput`-style output and call back into
the model for what depends on it (``model.fuse``, ``model.mlm_hidden``,
``model.distill_alpha``). State that changes during training (queues) is updated in
:meth:`after_step`, which the model calls after the optimiser step, never in forward.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from vlp.errors import ConfigError
from vlp.objectives.base import Objective, find_objective
from vlp.objectives.distributed import gather_no_grad
from vlp.objectives.itc import ITC

log = logging.getLogger("vlp")


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean over rows of -sum(targets * log_softmax(logits)); rows of ``targets`` sum to 1."""
    return -(F.log_softmax(logits, dim=-1) * targets).sum(dim=-1).mean()


class MomentumITC(ITC):
    """Image-text contrastive loss against a queue of momentum features (MoCo-style), with
    momentum distillation: targets are ``alpha * softmax(momentum sims) + (1 - alpha) * hard``.

    The online image features are scored against the momentum text features of the batch
    followed by the queue (and vice versa). ``alpha`` is the model's ``distill_alpha``
    (ALBEF: 0.4, ramped up over the first epoch); ``distill=False`` uses the hard targets.

    Args:
        queue_size: features kept per modality (ALBEF: 65,536; must be a multiple of the
            global batch size).
        embed_dim: width of the features.
        distill: use momentum distillation.
        temperature / min_temperature / max_temperature: ALBEF: 0.07 clamped to [0.001, 0.5].
        positives: "diagonal" (pretraining on web data), "same_id" (fine-tuning on datasets
            with several captions per image: every queue entry with the same ``image_id`` is
            positive) or "same_text" (every queue entry whose caption has the same tokens is
            positive: for data with many identical captions, such as templated or class
            captions, where a queue of thousands otherwise holds copies of the positive
            caption marked as negatives and the loss stalls).
    """

    name = "itc"
    requires = ("image_embeds", "text_embeds", "image_embeds_m", "text_embeds_m")

    def __init__(
        self,
        weight: float = 1.0,
        *,
        queue_size: int = 65536,
        embed_dim: int = 256,
        distill: bool = True,
        temperature: float = 0.07,
        min_temperature: float = 0.001,
        max_temperature: float = 0.5,
        positives: str = "diagonal",
    ) -> None:
        super().__init__(
            weight,
            temperature=temperature,
            min_temperature=min_temperature,
            max_temperature=max_temperature,
            positives="diagonal" if positives == "same_text" else positives,
        )
        self.positives = positives
        if queue_size < 1:
            raise ConfigError("MomentumITC: queue_size must be positive (use ITC for in-batch negatives)")
        self.distill = distill
        self.queue_size = queue_size
        self.needs_momentum = True
        self.register_buffer("image_queue", F.normalize(torch.randn(embed_dim, queue_size), dim=0))  # (E, Q)
        self.register_buffer("text_queue", F.normalize(torch.randn(embed_dim, queue_size), dim=0))  # (E, Q)
        self.register_buffer("idx_queue", torch.full((queue_size,), -100, dtype=torch.long))  # (Q,)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self._pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.requires_batch = {"same_id": ("image_id",), "same_text": ("text_ids", "text_mask")}.get(positives, ())

    def check_model(self, model: nn.Module) -> None:
        self.check_width("embed_dim", self.image_queue.shape[0], model, "itc")

    def sample_ids(self, batch: dict) -> torch.Tensor | None:
        """Ids whose equality marks positives: image ids, caption hashes, or None (diagonal)."""
        if self.positives == "same_id":
            return batch["image_id"].view(-1)
        if self.positives == "same_text":
            return text_hash(batch["text_ids"], batch["text_mask"])
        return None

    def forward(self, output, batch: dict, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        image, text = output.image_embeds, output.text_embeds  # (B, E) online, normalised
        image_m, text_m = output.image_embeds_m, output.text_embeds_m  # (B, E) momentum
        B = image.shape[0]
        scale = self.scale()
        image_all = torch.cat([image_m.T, self.image_queue.clone().detach()], dim=1)  # (E, B + Q)
        text_all = torch.cat([text_m.T, self.text_queue.clone().detach()], dim=1)  # (E, B + Q)
        ids = self.sample_ids(batch)  # (B,) or None
        if ids is not None:
            ids_all = torch.cat([ids, self.idx_queue])  # (B + Q,)
            hard = (ids[:, None] == ids_all[None, :]).float()  # (B, B + Q), includes the diagonal
            hard = hard / hard.sum(1, keepdim=True)
        else:
            hard = torch.zeros(B, B + self.queue_size, device=image.device)
            hard.fill_diagonal_(1.0)  # (B, B + Q): positives are the first B columns' diagonal
        alpha = float(getattr(model, "distill_alpha", 0.0)) if self.distill else 0.0
        with torch.no_grad():
            if alpha > 0:
                t_i2t = alpha * F.softmax(scale * image_m @ text_all, dim=1) + (1 - alpha) * hard
                t_t2i = alpha * F.softmax(scale * text_m @ image_all, dim=1) + (1 - alpha) * hard
            else:
                t_i2t = t_t2i = hard
        sim_i2t = scale * image @ text_all  # (B, B + Q)
        sim_t2i = scale * text @ image_all  # (B, B + Q)
        loss = (soft_cross_entropy(sim_i2t, t_i2t) + soft_cross_entropy(sim_t2i, t_t2i)) / 2
        if self.training:
            ids = ids if ids is not None else torch.full((B,), -100, device=image.device)
            self._pending = (image_m.detach(), text_m.detach(), ids.detach())
        with torch.no_grad():
            acc = (sim_i2t.argmax(1) == torch.arange(B, device=image.device)).float().mean()
        return {
            "itc_loss": loss,
            "itc_acc": acc,
            "itc_temperature": 1 / scale.detach(),
            "itc_alpha": torch.tensor(alpha),
        }

    @torch.no_grad()
    def on_init_from(self) -> None:
        """After ``init_from``: queued features stay (they are valid negatives), but their
        sample ids belong to the data the checkpoint was trained on, so they are forgotten."""
        self.idx_queue.fill_(-100)

    @torch.no_grad()
    def after_step(self, enqueue: bool = True) -> None:
        """Enqueue the last training batch's momentum features (gathered from all ranks);
        ``enqueue=False`` drops them (a skipped non-finite step)."""
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        if not enqueue:
            return
        image_m, text_m, ids = (gather_no_grad(t) for t in pending)
        n = image_m.shape[0]
        if self.queue_size % n:
            raise ConfigError(
                f"MomentumITC: queue_size {self.queue_size} is not a multiple of the global batch size {n}"
            )
        ptr = int(self.queue_ptr)
        self.image_queue[:, ptr : ptr + n] = image_m.T
        self.text_queue[:, ptr : ptr + n] = text_m.T
        self.idx_queue[ptr : ptr + n] = ids
        self.queue_ptr[0] = (ptr + n) % self.queue_size


@functools.lru_cache(maxsize=16)
def _hash_weights(n: int, device: torch.device) -> torch.Tensor:
    """Fixed random position weights (n,), drawn once per size and device; a longer table
    starts with the shorter one, so a caption hashes the same at any padded length."""
    return torch.randint(1, 2**61, (n,), generator=torch.Generator().manual_seed(12345)).to(device)


def text_hash(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A non-negative int64 hash per row of token ids (padding ignored): equal captions,
    equal hash (whatever the batch's padded length); different captions collide with
    probability ~2^-60."""
    ids = ids.long() * mask.long()  # (B, L)
    L = ids.shape[1]
    weights = _hash_weights(max(64, 1 << (L - 1).bit_length()), ids.device)[:L]  # (L,)
    h = (ids * weights).sum(1) + mask.long().sum(1) * 1_000_003  # wraps mod 2^64
    return h & (2**62 - 1)  # (B,)


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
        dim: width of the match features.
        hard_negatives: sample by ITC similarity (True; needs a model with ITC features:
            METER only has them with an ITC objective) or uniformly.
        temperature: used for the sampling softmax when the model has no ITC objective
            (ALBEF's projections then get no training signal: a warning says so).
        exclude_same_text: never use a caption identical to the positive one as a negative
            (it would be a false negative; matters for templated captions).
    """

    name = "itm"
    requires = ("text_tokens", "text_mask", "image_tokens", "fused_cls", "image_embeds", "text_embeds")
    requires_batch = ("image_id",)

    def __init__(
        self,
        weight: float = 1.0,
        *,
        dim: int = 768,
        hard_negatives: bool = True,
        temperature: float = 0.07,
        exclude_same_text: bool = True,
    ):
        super().__init__(weight)
        self.exclude_same_text = exclude_same_text
        self.head = nn.Linear(dim, 2)
        self.hard_negatives = hard_negatives
        self.temperature = temperature

    def check_model(self, model: nn.Module) -> None:
        if self.head is not None:
            self.check_width("dim", self.head.in_features, model, "match")
        if not self.hard_negatives or find_objective(model, "itc") is not None:
            return
        if "itc" not in (model.feature_dims() if hasattr(model, "feature_dims") else {}):
            raise ConfigError(
                f"objective {type(self).__name__} ({self.name}) samples hard negatives from ITC similarities, "
                f"but {type(model).__name__} has no ITC objective (and so no ITC features): add "
                f"vlp.objectives.ITC to the objectives or set {type(self).__name__}(hard_negatives: false)"
            )
        log.warning(
            "%s (%s): hard negatives come from the similarities of ITC projections that no ITC objective "
            "trains; add an ITC objective or set hard_negatives: false",
            type(self).__name__,
            self.name,
        )

    def negatives(self, output, batch: dict, model) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices (B,) of the negative image for each text and the negative text for each image."""
        ids = batch["image_id"].view(-1)  # (B,)
        forbidden = ids[:, None] == ids[None, :]  # (B, B), includes the diagonal
        if self.exclude_same_text:
            h = text_hash(batch["text_ids"], batch["text_mask"])  # (B,)
            forbidden = forbidden | (h[:, None] == h[None, :])
        with torch.no_grad():
            if self.hard_negatives:
                itc = find_objective(model, "itc")
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
        return {"itm_loss": loss, "itm_acc": acc}

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
    stream after fusion) and, for a tied decoder, ``word_embeddings() → (V, dim)``.

    Args:
        dim / vocab_size: text width and vocabulary.
        distill: use the momentum model's predictions (needs the model's momentum copies).
        tie_weights: decode with the text encoder's word embeddings (BERT, ALBEF) or with a
            matrix of the head's own (METER, ViLT; needed when the fused width differs from
            the embedding width).
    """

    name = "mlm"
    requires = ("image_tokens",)
    requires_batch = ("mlm_input_ids", "mlm_labels", "text_mask")

    def __init__(
        self,
        weight: float = 1.0,
        *,
        dim: int = 768,
        vocab_size: int = 30522,
        distill: bool = True,
        tie_weights: bool = True,
    ):
        super().__init__(weight)
        self.head = MLMHead(dim, vocab_size, tied=tie_weights)
        self.distill = distill
        self.needs_momentum = distill
        self.head_m = None  # the momentum copy exists only to distil
        if distill:
            self.head_m = MLMHead(dim, vocab_size, tied=tie_weights)
            self.head_m.load_state_dict(self.head.state_dict())
            self.head_m.requires_grad_(False)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.head, self.head_m)] if self.head_m is not None else []

    def check_model(self, model: nn.Module) -> None:
        dim, vocab = self.head.dense.in_features, self.head.bias.numel()
        self.check_width("dim", dim, model, "mlm")
        if self.head.decoder is not None or not hasattr(model, "word_embeddings"):
            return
        rows, width = model.word_embeddings().shape  # (V, Dt): the tied decoder
        if width != dim:
            raise ConfigError(
                f"MLM ({self.name}) with tie_weights: true decodes with the word embeddings (width {width}), "
                f"but its dim is {dim}: use MLM(tie_weights: false)"
            )
        if rows != vocab:
            raise ConfigError(
                f"MLM ({self.name}) has vocab_size {vocab}, but the word embeddings it decodes with "
                f"(tie_weights: true) have {rows} rows: set MLM(vocab_size: {rows})"
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
        hidden = model.mlm_hidden(ids, mask, output.image_tokens)  # (B, L, D)
        target = labels != -100  # (B, L)
        tied = self.head.decoder is None
        logits = self.head(hidden[target], model.word_embeddings() if tied else None)  # (M, V)
        loss = F.cross_entropy(logits, labels[target]) if target.any() else logits.sum() * 0
        alpha = float(getattr(model, "distill_alpha", 0.0)) if self.distill else 0.0
        if alpha > 0 and target.any():
            with torch.no_grad():
                hidden_m = model.mlm_hidden(ids, mask, output.image_tokens_m, momentum=True)  # (B, L, D)
                emb_m = model.word_embeddings(momentum=True) if tied else None
                soft = F.softmax(self.head_m(hidden_m[target], emb_m), dim=-1)
            loss = (1 - alpha) * loss + alpha * soft_cross_entropy(logits, soft)
        with torch.no_grad():
            acc = (logits.argmax(-1) == labels[target]).float().mean() if target.any() else logits.new_zeros(())
        return {"mlm_loss": loss, "mlm_acc": acc}
