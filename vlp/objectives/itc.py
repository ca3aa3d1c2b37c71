"""Image-text contrastive loss (CLIP's InfoNCE), gathered with gradients across ranks.

Each rank scores its own B images against the texts of all ranks (and vice versa):
the "local loss" of open_clip. With ``gather_with_grad`` the gradient reaching each
rank's features is that of the global loss, so 1 process on a batch of N and W
processes on N/W each give the same loss and the same gradients (tests/objectives).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlp.errors import ConfigError
from vlp.objectives.base import Objective
from vlp.utils.distributed import gather_no_grad, gather_with_grad, world_info


def contrastive_targets(ids: torch.Tensor, ids_all: torch.Tensor) -> torch.Tensor:
    """Soft targets (B, N): uniform over the columns sharing the row's id."""
    pos = (ids[:, None] == ids_all[None, :]).float()  # (B, N)
    return pos / pos.sum(1, keepdim=True)


class ITC(Objective):
    """Symmetric image-text InfoNCE with a learnable temperature.

    Args:
        weight / name / modalities: see :class:`~vlp.objectives.base.Objective`.
        temperature: initial temperature (CLIP and ALBEF: 0.07).
        learn_temperature: make the temperature a parameter.
        min_temperature / max_temperature: clamp range applied in forward (CLIP: 0.01,
            i.e. logit scale <= 100; ALBEF: [0.001, 0.5]).
        positives: "diagonal" (pair i ↔ text i) or "same_id" (every pair sharing an
            ``image_id`` is a positive, ALBEF/COCO-style with several captions per image).
        label_smoothing: mixed into the targets as in ``F.cross_entropy``.
    """

    default_name = "itc"
    requires = ("image_embeds", "text_embeds")
    provides = ("contrastive",)

    def __init__(
        self,
        weight: float = 1.0,
        *,
        name: str | None = None,
        modalities: list[str] | None = None,
        temperature: float = 0.07,
        learn_temperature: bool = True,
        min_temperature: float = 0.01,
        max_temperature: float = 1.0,
        positives: str = "diagonal",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(weight, name=name, modalities=modalities)
        if positives not in ("diagonal", "same_id"):
            raise ConfigError(f"ITC: positives must be 'diagonal' or 'same_id', got {positives!r}")
        if not 0 < min_temperature <= temperature <= max_temperature:
            raise ConfigError("ITC: need 0 < min_temperature <= temperature <= max_temperature")
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / temperature)), requires_grad=learn_temperature)
        self.min_temperature, self.max_temperature = min_temperature, max_temperature
        self.positives = positives
        self.label_smoothing = label_smoothing
        self.requires_batch = ("image_id",) if positives == "same_id" else ()

    def needs(self) -> dict[str, str]:
        return {"contrastive": "to contrast its image and text features"}

    def scale(self) -> torch.Tensor:
        """exp(logit_scale) clamped to [1/max_temperature, 1/min_temperature] (pure, no in-place clamp)."""
        return self.logit_scale.clamp(math.log(1 / self.max_temperature), math.log(1 / self.min_temperature)).exp()

    def logits(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Local-vs-global logits: (B, N) image→text and (B, N) text→image."""
        image_all, text_all = gather_with_grad(image), gather_with_grad(text)  # (N, D)
        scale = self.scale()
        return scale * image @ text_all.T, scale * text @ image_all.T

    def forward(self, output, batch: dict, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        image, text = output.image_embeds, output.text_embeds  # (B, D) each, L2-normalised
        if image.shape[0] != text.shape[0]:
            raise ValueError(f"ITC needs paired batches, got {image.shape[0]} images and {text.shape[0]} texts")
        logits_i2t, logits_t2i = self.logits(image, text)  # (B, N)
        rank, _ = world_info()
        B = image.shape[0]
        if self.positives == "diagonal":  # class-index targets: the fast cross-entropy path
            targets = torch.arange(B, device=image.device) + rank * B  # (B,)
        else:
            targets = contrastive_targets(batch["image_id"], gather_no_grad(batch["image_id"])).to(logits_i2t)
        loss_i2t = F.cross_entropy(logits_i2t, targets, label_smoothing=self.label_smoothing)
        loss_t2i = F.cross_entropy(logits_t2i, targets, label_smoothing=self.label_smoothing)
        with torch.no_grad():
            pred = logits_i2t.argmax(1)  # (B,)
            hit = pred == targets if targets.ndim == 1 else targets.gather(1, pred[:, None]).squeeze(1) > 0
            acc = hit.float().mean()
        return self.named(loss=(loss_i2t + loss_t2i) / 2, acc=acc, temperature=1 / self.scale().detach())
