"""Drawing scenes: a pure function of the scene (noise from a fixed tile bank)."""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from vlp.data.shapes.scenes import COLORS, JPEG_QUALITY, NOISE_TILES, Scene


@lru_cache(maxsize=4)
def _noise_bank(image_size: int) -> np.ndarray:
    rng = np.random.default_rng(image_size)
    return rng.integers(-8, 9, size=(NOISE_TILES, image_size, image_size, 3), dtype=np.int16)


def render_scene(scene: Scene, image_size: int = 64) -> Image.Image:
    """Draw ``scene``; a pure function of the scene (noise comes from a fixed tile bank)."""
    pixels = _noise_bank(image_size)[scene.noise % NOISE_TILES] + scene.background  # (H, W, 3)
    img = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        cx, cy, h = s.x * image_size, s.y * image_size, s.half * image_size
        box = (round(cx - h), round(cy - h), round(cx + h) - 1, round(cy + h) - 1)
        if s.kind == "circle":
            draw.ellipse(box, fill=COLORS[s.color])
        elif s.kind == "square":
            draw.rectangle(box, fill=COLORS[s.color])
        else:
            draw.polygon([((box[0] + box[2]) / 2, box[1]), (box[0], box[3]), (box[2], box[3])], fill=COLORS[s.color])
    return img


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()
