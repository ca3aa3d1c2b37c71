"""Masked image modelling over discrete image tokens (BEiT, FLAVA).

A frozen image tokenizer (``vlp.tokenizers``: DALL-E's dVAE, or a k-means codebook built
offline) gives every patch of the *unmasked* image a code; the masked patches' states are
classified into those codes (cross-entropy over the masked patches only). The model puts
the states in ``output.mim_hidden`` (B, N, D) and the codes in ``output.image_token_ids``
(B, N): FLAVA's unimodal MIM reads the image tower on ``image`` batches, its MMM image
loss the patch slice of the multimodal encoder on ``pair`` batches (the same class, two
instances: ``CodebookMIM(name: mmm_image, modalities: [pair])``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlp.errors import ConfigError
from vlp.objectives.base import Objective
from vlp.objectives.mlm import MLMHead


class CodebookMIM(Objective):
    """Predict the image tokenizer's code of each masked patch. Needs ``data.maskers`` with a
    ``vlp.data.PatchMasker`` (``image_mask`` (B, N), True = masked) on the tower's grid.

    Args:
        dim: width of the patch states (default: the model's ``mim`` view, per modality).
        vocab_size: number of codes (default: the model's image tokenizer's).
        norm_eps: the head's LayerNorm epsilon (FLAVA: 1e-12).

    The head is BERT's prediction head (dense → GELU → LayerNorm → decoder + bias), as
    FLAVA's ``mim_head`` / ``mmm_image_head``.
    """

    default_name = "mim"
    default_modalities = ("image",)
    requires = ("mim_hidden", "image_token_ids")
    requires_batch = ("image", "image_mask")

    def __init__(
        self,
        weight: float = 1.0,
        *,
        name: str | None = None,
        modalities: list[str] | None = None,
        dim: int | None = None,
        vocab_size: int | None = None,
        norm_eps: float = 1e-12,
    ) -> None:
        super().__init__(weight, name=name, modalities=modalities)
        self.norm_eps = norm_eps
        self.dim, self.vocab_size = dim, vocab_size
        self.head = None

    def needs(self) -> dict[str, str]:
        return {"codebook": "for the image tokenizer's codes that MIM predicts"}

    def setup(self, model: nn.Module) -> None:
        dim = self.width_of("dim", self.dim, model, "mim")
        vocab = self.width_of("vocab_size", self.vocab_size, model, "image_vocab")
        if self.head is None:
            self.head = MLMHead(dim, vocab, self.norm_eps, tied=False)

    def check_data(self, model: nn.Module, tokenizer, image_size: int | None) -> None:
        grid = getattr(getattr(model, "image_encoder", None), "grid_size", None)
        patch = getattr(getattr(model, "image_encoder", None), "patch_size", None)
        if image_size is not None and grid is not None and patch and image_size // patch != grid[0]:
            raise ConfigError(
                f"{type(self).__name__} ({self.name}) predicts a code per patch of the tower's "
                f"{grid[0]}x{grid[1]} grid, but data.image_size {image_size} gives a "
                f"{image_size // patch}x{image_size // patch} grid"
            )

    def forward(self, output, batch: dict, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        mask = batch["image_mask"].bool().flatten(1)  # (B, N)
        hidden, codes = output.mim_hidden, output.image_token_ids  # (B, N, D), (B, N)
        if hidden is None or codes is None:
            raise ConfigError(
                f"{type(self).__name__} ({self.name}) got no masked patch states or codes: the batch needs "
                "image_mask (data.maskers: [vlp.data.PatchMasker]) and the model an image tokenizer"
            )
        if codes.shape != mask.shape:
            raise ConfigError(
                f"{type(self).__name__} ({self.name}): the image tokenizer gives {tuple(codes.shape[1:])} codes "
                f"per image but the patch mask has {tuple(mask.shape[1:])}: its grid must be the tower's"
            )
        logits = self.head(hidden[mask])  # (M, K)
        target = codes[mask].long()  # (M,)
        loss = F.cross_entropy(logits, target) if mask.any() else logits.sum() * 0
        with torch.no_grad():
            acc = (logits.argmax(-1) == target).float().mean() if mask.any() else logits.new_zeros(())
        return self.named(loss=loss, acc=acc)
