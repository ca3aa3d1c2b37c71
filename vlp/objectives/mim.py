"""Masked image modelling through a fusion encoder's image stream (METER's MIM ablation).

Masked patches are replaced by a learnable token at the vision encoder's input (after the
patch embedding, before the position embeddings: BEiT's scheme), the image goes through
the tower and the fusion with the text, and a linear head regresses the masked patches'
pixels from the fused image tokens, normalised per patch as in MAE ("masked patch
regression"). The paper reports that MIM hurts METER's downstream results; the objective
exists so that the ablation is one recipe file away.
"""

from __future__ import annotations

import torch
from torch import nn

from vlp.errors import ConfigError
from vlp.objectives.base import Objective


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) → (B, h*w, p*p*C), patches in row-major order, pixels (p, p, C) per patch."""
    B, C, H, W = images.shape
    p = patch_size
    if H % p or W % p:
        raise ConfigError(f"image size {H}x{W} is not a multiple of the patch size {p}")
    x = images.reshape(B, C, H // p, p, W // p, p)  # (B, C, h, p, w, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)


class MIM(Objective):
    """Masked patch regression through the fusion. Needs ``data.maskers`` with a
    ``vlp.data.PatchMasker`` (``image_mask`` (B, h*w), True = masked) whose grid matches
    the vision tower, and a model with ``embed_image(image, patch_mask=, mask_token=)`` and
    a fusion that returns an image stream (METER).

    Args:
        dim: width of the fused image tokens (default: the model's).
        encoder_dim: width of the vision tower's patch embeddings (the mask token's width;
            default: the model's).
        patch_size: pixels per patch side.
        norm_pix: regress per-patch normalised pixels (MAE) instead of raw ones.
    """

    default_name = "mim"
    requires = ("text_tokens", "text_mask")
    requires_batch = ("image", "image_mask")

    def __init__(
        self,
        weight: float = 1.0,
        *,
        name: str | None = None,
        modalities: list[str] | None = None,
        dim: int | None = None,
        encoder_dim: int | None = None,
        patch_size: int = 16,
        norm_pix: bool = True,
    ) -> None:
        super().__init__(weight, name=name, modalities=modalities)
        self.patch_size = patch_size
        self.norm_pix = norm_pix
        self.mask_token = nn.Parameter(torch.empty(encoder_dim).normal_(std=0.02)) if encoder_dim else None
        self.head = nn.Linear(dim, patch_size * patch_size * 3) if dim else None

    def needs(self) -> dict[str, str]:
        return {"fusion": "to reconstruct patches from the fused image stream", "image_types": "to embed masked images"}

    def setup(self, model: nn.Module) -> None:
        dim = self.width_of("dim", self.head.in_features if self.head is not None else None, model, "fused_image")
        given = self.mask_token.numel() if self.mask_token is not None else None
        encoder_dim = self.width_of("encoder_dim", given, model, "image_tokens")
        if self.head is None:
            self.head = nn.Linear(dim, self.patch_size * self.patch_size * 3)
        if self.mask_token is None:
            self.mask_token = nn.Parameter(torch.empty(encoder_dim).normal_(std=0.02))

    def check_data(self, model: nn.Module, tokenizer, image_size: int | None) -> None:
        p = self.patch_size
        if image_size is None:
            return
        if image_size % p:
            raise ConfigError(f"data.image_size {image_size} is not a multiple of MIM's patch_size {p}")
        grid = getattr(getattr(model, "image_encoder", None), "grid_size", None)
        if grid is not None and image_size // p * (image_size // p) != grid[0] * grid[1]:
            raise ConfigError(
                f"MIM's patch_size {p} cuts data.image_size {image_size} into {(image_size // p) ** 2} patches, "
                f"but model.image_encoder has a {grid[0]}x{grid[1]} patch grid: set MIM(patch_size) to the tower's"
            )

    def target(self, images: torch.Tensor) -> torch.Tensor:
        """Regression target (B, N, p*p*3)."""
        target = patchify(images.float(), self.patch_size)
        if self.norm_pix:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        return target

    def forward(self, output, batch: dict, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        mask = batch["image_mask"].bool()  # (B, N)
        tokens, _ = model.embed_image(batch["image"], patch_mask=mask, mask_token=self.mask_token)  # (B, P + N, D)
        fused = model.fuse(output.text_tokens, output.text_mask, tokens)
        image = getattr(fused, "image_tokens", None)
        if image is None:
            raise ConfigError(f"MIM needs a fusion with an image stream; {type(model).__name__}'s has none")
        patches = image[:, image.shape[1] - mask.shape[1] :]  # (B, N, D): the prefix tokens dropped
        error = (self.head(patches) - self.target(batch["image"])).pow(2).mean(-1)  # (B, N)
        loss = error[mask].mean() if mask.any() else error.sum() * 0
        return self.named(loss=loss)
