"""Image decoding and transforms.

Decoding is strict: anything PIL cannot fully load raises :class:`ImageDecodeError`, which
the pipeline turns into a counted, logged skip. Real photos come as grayscale, CMYK,
palette, 16-bit or EXIF-rotated files; all of them end up as upright 8-bit RGB.

Horizontal flips are OFF by default: they silently break captions that say "left of".
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2 as T

#: Normalisation constants by name.
NORMS = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


class ImageDecodeError(ValueError):
    """The bytes are not a decodable image."""


def decode_image(data: bytes) -> Image.Image:
    """Bytes → upright RGB PIL image; raises ImageDecodeError with PIL's reason."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # force full decode: truncated files fail here, not later in a worker
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I", "F") or img.mode.startswith("I;16"):
            img = _to_8bit(img)
        if img.mode != "RGB":
            if img.mode in ("RGBA", "LA", "P") and ("transparency" in img.info or img.mode != "P"):
                background = Image.new("RGB", img.size, (255, 255, 255))
                rgba = img.convert("RGBA")
                background.paste(rgba, mask=rgba.getchannel("A"))
                img = background
            else:
                img = img.convert("RGB")
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise ImageDecodeError(f"{type(e).__name__}: {e}") from None
    if img.width < 1 or img.height < 1:
        raise ImageDecodeError(f"empty image of size {img.size}")
    return img


def _to_8bit(img: Image.Image) -> Image.Image:
    """A 16/32-bit integer or float grayscale image → 8-bit "L" (PIL's own conversion clips
    everything above 255 to white). 16-bit modes, and "I" / "F" images with values above 255,
    are scaled by 255/65535 (0 → 0, 65535 → 255); "F" images within [0, 1] by 255."""
    a = np.asarray(img, dtype=np.float64)  # (H, W)
    a = np.nan_to_num(a, nan=0.0, posinf=65535.0, neginf=0.0)
    top = a.max() if a.size else 0.0
    if img.mode == "F" and 0 < top <= 1 and a.min() >= 0:
        a = a * 255
    elif img.mode.startswith("I;16") or top > 255:
        a = a / 257
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


@dataclass
class ImageTransform:
    """Train/eval image transform.

    Args:
        size: output side in pixels (square).
        train: random resized crop (and optional flip) when True; resize + centre crop otherwise.
        crop_scale: area range of the random resized crop.
        hflip: random horizontal flip probability (0 keeps "left"/"right" captions true).
        norm: "clip", "imagenet", "half" or explicit ((mean...), (std...)).
        normalize: end with a normalised float tensor; when False the transform stops at
            uint8 and :meth:`normalize_batch` finishes the job on the accelerator, which
            makes the CPU side about 4x cheaper and the host-to-device copy 4x smaller.
    """

    size: int = 224
    train: bool = False
    crop_scale: tuple[float, float] = (0.5, 1.0)
    hflip: float = 0.0
    norm: str | tuple = "clip"
    normalize: bool = True

    def __post_init__(self) -> None:
        mean, std = NORMS[self.norm] if isinstance(self.norm, str) else self.norm
        interp = T.InterpolationMode.BICUBIC
        if self.train:
            ops = [T.RandomResizedCrop(self.size, scale=tuple(self.crop_scale), interpolation=interp, antialias=True)]
            if self.hflip > 0:
                ops.append(T.RandomHorizontalFlip(self.hflip))
        else:
            ops = [T.Resize(self.size, interpolation=interp, antialias=True), T.CenterCrop(self.size)]
        ops.append(T.PILToTensor())
        if self.normalize:
            ops += [T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]
        self._tf = T.Compose(ops)
        self._mean, self._std = mean, std

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self._tf(img)  # (3, size, size): float, or uint8 when normalize=False

    def normalize_batch(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (..., 3, H, W), on any device → normalised float32, as ``__call__``
        with ``normalize=True`` would give; float input is returned unchanged."""
        if images.is_floating_point():
            return images
        mean = torch.tensor(self._mean, device=images.device)[:, None, None]  # (3, 1, 1)
        std = torch.tensor(self._std, device=images.device)[:, None, None]
        return (images.float() / 255 - mean) / std
