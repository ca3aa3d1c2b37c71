"""ITC against a queue of momentum features with momentum distillation (ALBEF, Li et al.
2021), and the pieces other objectives share: the soft cross-entropy of distillation and
a caption hash that marks identical captions as positives (or never as negatives).

The queue is updated in :meth:`MomentumITC.after_optimizer_step`, never in forward.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from vlp.errors import ConfigError
from vlp.objectives.itc import ITC
from vlp.utils.distributed import gather_no_grad


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean over rows of -sum(targets * log_softmax(logits)); rows of ``targets`` sum to 1."""
    return -(F.log_softmax(logits, dim=-1) * targets).sum(dim=-1).mean()


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


class MomentumITC(ITC):
    """Image-text contrastive loss against a queue of momentum features (MoCo-style), with
    momentum distillation: targets are ``alpha * softmax(momentum sims) + (1 - alpha) * hard``.

    The online image features are scored against the momentum text features of the batch
    followed by the queue (and vice versa). ``alpha`` is the model's ``distill_alpha``
    (ALBEF: 0.4, ramped up over the first epoch); ``distill=False`` uses the hard targets.

    Args:
        queue_size: features kept per modality (ALBEF: 65,536; must be a multiple of the
            global batch size).
        embed_dim: width of the features (default: the model's ITC width).
        distill: use momentum distillation.
        temperature / min_temperature / max_temperature: ALBEF: 0.07 clamped to [0.001, 0.5].
        positives: "diagonal" (pretraining on web data), "same_id" (fine-tuning on datasets
            with several captions per image: every queue entry with the same ``image_id`` is
            positive) or "same_text" (every queue entry whose caption has the same tokens is
            positive: for data with many identical captions, such as templated or class
            captions, where a queue of thousands otherwise holds copies of the positive
            caption marked as negatives and the loss stalls).
    """

    requires = ("image_embeds", "text_embeds", "image_embeds_m", "text_embeds_m")

    def __init__(
        self,
        weight: float = 1.0,
        *,
        name: str | None = None,
        modalities: list[str] | None = None,
        queue_size: int = 65536,
        embed_dim: int | None = None,
        distill: bool = True,
        temperature: float = 0.07,
        min_temperature: float = 0.001,
        max_temperature: float = 0.5,
        positives: str = "diagonal",
    ) -> None:
        super().__init__(
            weight,
            name=name,
            modalities=modalities,
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
        self.register_buffer("idx_queue", torch.full((queue_size,), -100, dtype=torch.long))  # (Q,)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.register_buffer("image_queue", None)  # (E, Q) once the width is known
        self.register_buffer("text_queue", None)
        if embed_dim is not None:
            self._make_queues(embed_dim)
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # this step's micro-batches
        self.requires_batch = {"same_id": ("image_id",), "same_text": ("text_ids", "text_mask")}.get(positives, ())

    def _make_queues(self, dim: int) -> None:
        self.register_buffer("image_queue", F.normalize(torch.randn(dim, self.queue_size), dim=0))  # (E, Q)
        self.register_buffer("text_queue", F.normalize(torch.randn(dim, self.queue_size), dim=0))  # (E, Q)

    def needs(self) -> dict[str, str]:
        return {**super().needs(), "momentum": "for the queue's momentum features"}

    def setup(self, model: nn.Module) -> None:
        dim = self.width_of("embed_dim", None if self.image_queue is None else self.image_queue.shape[0], model, "itc")
        if self.image_queue is None:
            self._make_queues(dim)

    def sample_ids(self, batch: dict) -> torch.Tensor | None:
        """Ids whose equality marks positives: image ids, caption hashes, or None (diagonal)."""
        if self.positives == "same_id":
            return batch["image_id"].view(-1)
        if self.positives == "same_text":
            return text_hash(batch["text_ids"], batch["text_mask"])
        return None

    def forward(self, output, batch: dict, model: nn.Module) -> dict[str, torch.Tensor]:
        image, text = output.image_embeds, output.text_embeds  # (B, E) online, normalised
        image_m, text_m = output.image_embeds_m, output.text_embeds_m  # (B, E) momentum
        B = image.shape[0]
        scale = self.scale()
        # the queues are only written after the optimiser step, so they are read in place:
        # scores against the batch and against the queue, side by side (no copy of the queue)
        image_queue, text_queue = self.image_queue.detach(), self.text_queue.detach()  # (E, Q)
        sim_i2t = scale * torch.cat([image @ text_m.T, image @ text_queue], 1)  # (B, B + Q)
        sim_t2i = scale * torch.cat([text @ image_m.T, text @ image_queue], 1)  # (B, B + Q)
        ids = self.sample_ids(batch)  # (B,) or None
        alpha = float(model.distill_alpha) if self.distill else 0.0
        diagonal = torch.arange(B, device=image.device)  # (B,) the positive column of each row
        if ids is None and alpha == 0:  # one-hot targets: the class-index cross-entropy path
            loss = (F.cross_entropy(sim_i2t, diagonal) + F.cross_entropy(sim_t2i, diagonal)) / 2
        else:
            with torch.no_grad():
                if ids is not None:
                    ids_all = torch.cat([ids, self.idx_queue])  # (B + Q,)
                    hard = (ids[:, None] == ids_all[None, :]).float()  # (B, B + Q), includes the diagonal
                    hard = hard / hard.sum(1, keepdim=True)
                t_i2t, t_t2i = [], []
                for targets, a, b, queue in (
                    (t_i2t, image_m, text_m, text_queue),
                    (t_t2i, text_m, image_m, image_queue),
                ):
                    if alpha > 0:
                        soft = F.softmax(scale * torch.cat([a @ b.T, a @ queue], 1), dim=1) * alpha  # (B, B + Q)
                        if ids is None:
                            soft[diagonal, diagonal] += 1 - alpha
                        else:
                            soft += (1 - alpha) * hard
                        targets.append(soft)
                    else:
                        targets.append(hard)
            loss = (soft_cross_entropy(sim_i2t, t_i2t[0]) + soft_cross_entropy(sim_t2i, t_t2i[0])) / 2
        if self.training:
            ids = ids if ids is not None else torch.full((B,), -100, device=image.device)
            self._pending.append((image_m.detach(), text_m.detach(), ids.detach()))
        with torch.no_grad():
            acc = (sim_i2t.argmax(1) == diagonal).float().mean()
        return self.named(loss=loss, acc=acc, temperature=1 / scale.detach(), alpha=torch.tensor(alpha))

    @torch.no_grad()
    def after_init_from(self, model: nn.Module) -> None:
        """After ``init_from``: queued features stay (they are valid negatives), but their
        sample ids belong to the data the checkpoint was trained on, so they are forgotten."""
        self.idx_queue.fill_(-100)

    @torch.no_grad()
    def after_optimizer_step(self, model: nn.Module, *, skipped: bool = False) -> None:
        """Enqueue the momentum features of this step's batches (every micro-batch of an
        accumulated step, gathered from all ranks), once per optimiser step; a skipped
        (non-finite) step drops them."""
        pending, self._pending = self._pending, []
        if skipped:
            return
        for features in pending:
            self._enqueue(*(gather_no_grad(t) for t in features))

    def _enqueue(self, image_m: torch.Tensor, text_m: torch.Tensor, ids: torch.Tensor) -> None:
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
