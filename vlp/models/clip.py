"""CLIP-style dual encoder (Radford et al., 2021): the baseline of every other family.

    image ─► image_encoder ─► pooled ─► image_proj ─► L2 norm ─┐
                                                               ├─► ITC (learnable temperature)
    text  ─► text_encoder  ─► pooled ─► text_proj  ─► L2 norm ─┘

Evaluation: image↔text retrieval R@1/5/10 over the whole split (several captions per
image allowed, any number of samples per rank), gathered across ranks; the table is
printed after ``vlp test``. Image splits: zero-shot classification and a linear probe on
the pooled image features (:mod:`vlp.eval.classification`). Image-only and text-only
batches embed one side.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlp.encoders.base import Encoder
from vlp.errors import ConfigError
from vlp.eval.classification import ImageClassificationEvaluator
from vlp.eval.evaluator import Evaluator, RetrievalEvaluator
from vlp.models.base import OptimConfig, VLPModule
from vlp.models.outputs import DualEncoderOutput
from vlp.objectives.base import Objective
from vlp.objectives.itc import ITC


def make_projection(in_dim: int, out_dim: int, kind: str) -> nn.Module:
    """ "linear" (CLIP), "mlp" (Linear-GELU-Linear, SimCLR-style) or "none" (identity)."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim, bias=False)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim))
    if kind == "none":
        if in_dim != out_dim:
            raise ConfigError(f"projection 'none' needs equal widths, got {in_dim} -> {out_dim}")
        return nn.Identity()
    raise ConfigError(f"unknown projection {kind!r}; expected linear, mlp or none")


class CLIP(VLPModule):
    """Dual encoder trained with image-text contrastive learning.

    Args:
        image_encoder: vision tower (``vlp.encoders``), its pooled output is projected.
        text_encoder: text tower.
        objectives: default ``[ITC()]``.
        embed_dim: width of the shared embedding space.
        projection: "linear", "mlp" or "none".
        lock_image: freeze the image tower (LiT), leaving this many top layer groups trainable.
        lock_text: the same for the text tower.
        optim / init_from: see :class:`~vlp.models.base.VLPModule`.
    """

    output_type = DualEncoderOutput

    def __init__(
        self,
        image_encoder: Encoder,
        text_encoder: Encoder,
        objectives: list[Objective] | None = None,
        *,
        embed_dim: int = 512,
        projection: str = "linear",
        lock_image: int | None = None,
        lock_text: int | None = None,
        optim: OptimConfig | None = None,
        init_from: str | None = None,
    ) -> None:
        super().__init__(objectives if objectives is not None else [ITC()], optim=optim, init_from=init_from)
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.embed_dim = embed_dim
        self.image_proj = make_projection(image_encoder.pooled_dim, embed_dim, projection)
        self.text_proj = make_projection(text_encoder.pooled_dim, embed_dim, projection)
        if lock_image is not None:
            image_encoder.lock(unlocked_layers=lock_image)
        if lock_text is not None:
            text_encoder.lock(unlocked_layers=lock_text)
        self.setup_objectives()

    def capabilities(self) -> set[str]:
        return {"contrastive", "text"}

    def capability_hint(self, capability: str) -> str:
        return "a dual encoder has no fusion: use ALBEF or METER for objectives on fused pairs"

    def feature_dims(self) -> dict[str, int]:
        return {"itc": self.embed_dim, "text": self.text_encoder.pooled_dim}

    # -- the model ------------------------------------------------------------------------
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        pooled = self.image_encoder(image).pooled  # (B, Dv)
        return F.normalize(self.image_proj(pooled), dim=-1)  # (B, E)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = self.text_encoder(input_ids, attention_mask).pooled  # (B, Dt)
        return F.normalize(self.text_proj(pooled), dim=-1)  # (B, E)

    def forward(self, batch: dict) -> DualEncoderOutput:
        """The embeddings of the batch's images and texts (either may be absent)."""
        out = DualEncoderOutput()
        if "image" in batch:
            out.image_pooled = self.image_encoder(batch["image"]).pooled  # (B, Dv)
            out.image_embeds = F.normalize(self.image_proj(out.image_pooled), dim=-1)  # (B, E)
        if "text_ids" in batch:
            out.text_embeds = self.encode_text(batch["text_ids"], batch["text_mask"])
        return out

    # -- evaluation -----------------------------------------------------------------------
    def default_evaluator(self, modality: str) -> Evaluator | None:
        if modality == "image":
            return ImageClassificationEvaluator()
        return RetrievalEvaluator() if modality in ("pair", "retrieval") else None
