"""Image decoding and transforms.

Decoding is strict: anything PIL cannot fully load raises :class:`ImageDecodeError`, which
the pipeline turns into a counted, logged skip. Real photos come as grayscale, CMYK,
palette, 16-bit or EXIF-rotated files; all of them end up as upright 8-bit RGB.

Horizontal flips are OFF by default: they silently break captions that say "left of".

Several views of one image (FLAVA's codebook input next to the model input) come from a
:class:`MultiViewTransform`: by default every view is the same random-resized crop (and
flip) resized to its own size and normalised its own way.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as F

from vlp.errors import ConfigError

#: Normalisation constants by name.
NORMS = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "unit": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),  # plain [0, 1] (e.g. a dVAE codebook's input)
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
        norm: "clip", "imagenet", "half", "unit" ([0, 1]) or explicit ((mean...), (std...)).
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
        tail = [T.PILToTensor()]
        if self.normalize:
            tail += [T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]
        self._tf = T.Compose(ops + tail)
        self._from_crop = T.Compose([T.Resize((self.size, self.size), interpolation=interp, antialias=True), *tail])
        self._mean, self._std = mean, std

    def from_crop(self, crop: Image.Image) -> torch.Tensor:
        """An already cropped (and flipped) image resized to ``size`` and converted like ``__call__``."""
        return self._from_crop(crop)  # (3, size, size)

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


#: Keys of a view spec (``views: {name: {size, norm, crop_scale}}``).
VIEW_KEYS = ("size", "norm", "crop_scale")
#: View names that would collide with other batch keys (``image_id``, ``image_mask``).
RESERVED_VIEWS = ("id", "mask")


@dataclass(frozen=True)
class ViewSpec:
    """One extra view of each image: batch key ``image_<name>`` (and ``image2_<name>``).

    Args:
        size: side of the square view in pixels.
        norm: its normalisation (a name of ``NORMS`` such as ``unit`` for [0, 1], or
            (mean, std)).
        crop_scale: None (default) makes the view the same crop (and flip) as the main
            image, resized to ``size``; an area range draws an independent crop.
    """

    size: int
    norm: str | tuple = "clip"
    crop_scale: tuple[float, float] | None = None


def parse_views(views: dict | None, where: str) -> dict[str, ViewSpec]:
    """``{name: {size, norm?, crop_scale?}}`` from a config → checked :class:`ViewSpec` s;
    a ConfigError names ``<where>.<name>`` and the bad key or value."""
    if views is None:
        return {}
    if not isinstance(views, dict):
        raise ConfigError(f"{where} must be a mapping of view name to {{size, norm, crop_scale}}, got {views!r}")
    out = {}
    for name, spec in views.items():
        at = f"{where}.{name}"
        if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9_]+", name) or name in RESERVED_VIEWS:
            raise ConfigError(f"{at}: a view name must be lower-case letters, digits or _ and not {RESERVED_VIEWS}")
        if isinstance(spec, ViewSpec):
            spec = vars(spec)
        if not isinstance(spec, dict) or "size" not in spec:
            raise ConfigError(f"{at} must be a mapping with at least 'size', got {spec!r}")
        unknown = set(spec) - set(VIEW_KEYS)
        if unknown:
            raise ConfigError(f"{at}: unknown key(s) {sorted(unknown)}; a view has {', '.join(VIEW_KEYS)}")
        size, norm, scale = spec["size"], spec.get("norm", "clip"), spec.get("crop_scale")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"{at}.size must be an integer >= 1, got {size!r}")
        if isinstance(norm, str):
            if norm not in NORMS:
                raise ConfigError(f"{at}.norm must be one of {', '.join(NORMS)} or [mean, std], got {norm!r}")
        elif not (len(norm) == 2 and all(len(v) == 3 for v in norm)):
            raise ConfigError(f"{at}.norm must be a name or [[3 means], [3 stds]], got {norm!r}")
        else:
            norm = (tuple(map(float, norm[0])), tuple(map(float, norm[1])))
        if scale is not None:
            if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
                raise ConfigError(f"{at}.crop_scale must be [low, high] with 0 < low <= high <= 1, got {scale!r}")
            scale = (float(scale[0]), float(scale[1]))
        out[name] = ViewSpec(size, norm, scale)
    return out


class MultiViewTransform:
    """Several views of one image: ``{"": main, name: view, ...}``.

    Training: one random-resized crop (area range of ``main``, aspect 3/4..4/3) and one
    flip decision are drawn; the main image and every view without its own
    ``crop_scale`` are that crop resized to their sizes (FLAVA's and BEiT's two
    resolutions of the same crop). A view with ``crop_scale`` draws its own crop (and
    flip). Evaluation: each view is resized and centre-cropped, which covers the same
    region at every size.

    Args:
        main: the transform of the default ``image``.
        views: extra views by name.
    """

    def __init__(self, main: ImageTransform, views: dict[str, ViewSpec]) -> None:
        self.main = main
        self.specs = dict(views)
        self.views = {
            name: ImageTransform(
                v.size,
                train=main.train,
                crop_scale=v.crop_scale or main.crop_scale,
                hflip=main.hflip,
                norm=v.norm,
                normalize=main.normalize,
            )
            for name, v in views.items()
        }

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
        if not self.main.train:
            return {"": self.main(img), **{name: tf(img) for name, tf in self.views.items()}}
        top, left, h, w = T.RandomResizedCrop.get_params(img, scale=list(self.main.crop_scale), ratio=[3 / 4, 4 / 3])
        crop = F.crop(img, top, left, h, w)
        if self.main.hflip > 0 and torch.rand(1).item() < self.main.hflip:
            crop = F.horizontal_flip(crop)
        out = {"": self.main.from_crop(crop)}
        for name, tf in self.views.items():
            out[name] = tf.from_crop(crop) if self.specs[name].crop_scale is None else tf(img)
        return out

    def normalize_batch(self, images: torch.Tensor) -> torch.Tensor:
        return self.main.normalize_batch(images)


def split_views(example: dict) -> dict:
    """Flatten the views a :class:`MultiViewTransform` made: ``example[key] = {"": main,
    name: view}`` becomes ``example[key]`` (main) and ``example[f"{key}_{name}"]``."""
    for key in [k for k, v in example.items() if isinstance(v, dict)]:
        views = example.pop(key)
        example[key] = views[""]
        for name, view in views.items():
            if name:
                example[f"{key}_{name}"] = view
    return example
