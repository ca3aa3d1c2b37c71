"""The interface of a frozen image tokenizer: pixels in, one discrete token id per patch out.

FLAVA's masked image (MIM) and masked multimodal (MMM) objectives predict, for every masked
patch, the id a frozen tokenizer gives that patch. A tokenizer sits inside the model as a
submodule, so it moves to the model's device with it, but it never trains: its parameters
have ``requires_grad=False`` (the optimiser skips them) and it stays in eval mode when the
parent calls ``.train()``.

Input contract: ``forward(pixels)`` takes the tokenizer's own view of the image, RGB in
[0, 1] (float, or uint8 in [0, 255]) of shape (B, 3, h * patch_size, w * patch_size), e.g. a
data view ``views: {codebook: {size: 112, norm: unit}}`` (``batch["image_codebook"]``).
Without such a view, :meth:`ImageTokenizer.encode` builds that input from the model's
normalised image batch (undo the normalisation, resize to the patch grid's size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlp.data.transforms import NORMS
from vlp.errors import ConfigError


def to_unit(images: torch.Tensor, norm: str | tuple = "clip") -> torch.Tensor:
    """Undo a normalisation: (B, 3, H, W) normalised with ``norm`` (a name of
    ``vlp.data.transforms.NORMS`` or ``(means, stds)``) → float pixels clamped to [0, 1].
    uint8 images are taken as raw pixels and only scaled."""
    if not images.is_floating_point():
        return images.float() / 255
    if isinstance(norm, str):
        if norm not in NORMS:
            raise ConfigError(f"norm must be one of {', '.join(NORMS)} or [means, stds], got {norm!r}")
        norm = NORMS[norm]
    mean, std = (torch.tensor(v, dtype=images.dtype, device=images.device)[:, None, None] for v in norm)  # (3, 1, 1)
    return (images * std + mean).clamp(0, 1)


def _pair(grid: int | tuple[int, int]) -> tuple[int, int]:
    return (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))


class ImageTokenizer(nn.Module):
    """Base class: subclasses set ``num_codes`` and ``patch_size`` and implement
    :meth:`tokenize`.

    Attributes:
        num_codes: vocabulary size; token ids are in ``[0, num_codes)``.
        patch_size: input pixels per token side: the input must be ``h * patch_size`` by
            ``w * patch_size`` pixels to give an ``h`` x ``w`` token grid (8 for the DALL-E
            dVAE: 112 px for a 14 x 14 patch grid; the model's patch for k-means).
    """

    num_codes: int
    patch_size: int

    def freeze(self) -> ImageTokenizer:
        """No gradients, eval mode; called by subclasses once their weights are in place."""
        self.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> ImageTokenizer:
        # a frozen tokenizer stays in eval mode whatever its parent asks
        return super().train(False)

    def extra_repr(self) -> str:
        return f"num_codes={self.num_codes}, patch_size={self.patch_size}"

    def input_size(self, grid: int | tuple[int, int]) -> tuple[int, int]:
        """The (H, W) in pixels of the input that gives a ``grid`` of tokens."""
        h, w = _pair(grid)
        return h * self.patch_size, w * self.patch_size

    def check_input(self, pixels: torch.Tensor) -> None:
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ConfigError(
                f"{type(self).__name__} takes RGB images (B, 3, H, W), got a tensor of shape {tuple(pixels.shape)}"
            )
        H, W = pixels.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ConfigError(
                f"{type(self).__name__}: image size {H}x{W} is not a multiple of its patch size {self.patch_size} "
                f"(give it {self.patch_size} px per token, e.g. a view of size grid x {self.patch_size})"
            )

    def tokenize(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float pixels in [0, 1] → (B, H / patch_size, W / patch_size) token ids."""
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels in [0, 1] (float) or [0, 255] (uint8) → LongTensor
        (B, H / patch_size, W / patch_size) of token ids, patches in row-major order
        (``.flatten(1)`` lines up with ``vlp.objectives.mim.patchify``)."""
        self.check_input(pixels)
        if not pixels.is_floating_point():
            pixels = pixels.float() / 255
        # targets must not depend on the run's precision: no autocast inside the tokenizer
        with torch.autocast(pixels.device.type, enabled=False):
            return self.tokenize(pixels.float())

    def get_codebook_indices(self, pixels: torch.Tensor) -> torch.Tensor:
        """The name transformers' ``FlavaImageCodebook`` uses for :meth:`forward`."""
        return self(pixels)

    def prepare(
        self, images: torch.Tensor, *, norm: str | tuple = "clip", grid: int | tuple[int, int] | None = None
    ) -> torch.Tensor:
        """The model's image batch (B, 3, H, W), normalised with ``norm``, → this tokenizer's
        input: [0, 1] pixels resized (bicubic, antialiased) to ``grid`` x ``patch_size``
        (``grid`` None: the size the images have)."""
        pixels = to_unit(images, norm)  # (B, 3, H, W) in [0, 1]
        size = self.input_size(grid) if grid is not None else tuple(pixels.shape[-2:])
        if tuple(pixels.shape[-2:]) != size:
            pixels = F.interpolate(pixels, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        return pixels

    def encode(
        self, images: torch.Tensor, *, norm: str | tuple = "clip", grid: int | tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Token ids (B, h, w) of the model's normalised image batch: :meth:`prepare`, then
        :meth:`forward`; pass the model's patch ``grid`` so that there is one token per patch."""
        return self(self.prepare(images, norm=norm, grid=grid))
