"""Prompts for generation (``vlp predict`` with a generative family: Flamingo).

A prompt is a document left open for the model to continue: ``<image>Output:`` for a
caption, ``<image>Question: what colour is the circle? Short answer:`` for VQA, or any
interleaved text with several images. They come from

* a folder of images (``images: DIR``): one prompt per image, ``prompt`` with its one
  ``<image>`` (default ``<image>Output:``), in file-name order; or
* a file of documents (``documents: FILE``, ``.jsonl`` or ``.yaml``): each
  ``{"text": "...<image>...", "images": [paths relative to the file], "key": optional}``.

``vlp predict --ckpt RUN.ckpt --data.init_args.prompts.images photos/`` writes one json
line per prompt to ``prompts.out`` (``{"key", "prompt", "text"}``). An unreadable image is
reported in its line (``"error"``) and counted, never dropped silently.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from vlp.data.interleaved import MEDIA_TOKEN, media_token_ids, pad_images
from vlp.data.tokenization import Tokenizer
from vlp.errors import ConfigError, DataError

log = logging.getLogger("vlp.data")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


@dataclass
class Prompts:
    """What ``vlp predict`` generates from (see the module docstring).

    Args:
        images: a folder of images, one prompt each.
        documents: a ``.jsonl`` / ``.yaml`` file of prompt documents.
        prompt: the text of each image's prompt (one ``<image>`` mark).
        out: the json-lines file the generations are written to.
        max_new_tokens / num_beams / length_penalty: decoding settings.
        batch_size: prompts per forward pass.
    """

    images: str | None = None
    documents: str | None = None
    prompt: str = f"{MEDIA_TOKEN}Output:"
    out: str = "predictions.jsonl"
    max_new_tokens: int = 20
    num_beams: int = 3
    length_penalty: float = 1.0
    batch_size: int = 8


def read_prompts(spec: Prompts) -> list[dict]:
    """→ ``[{"key", "text", "images": [Path, ...]}]``; a ConfigError names a missing folder or
    file, a DataError a document whose marks and images differ in number."""
    if (spec.images is None) == (spec.documents is None):
        raise ConfigError("data.prompts: give exactly one of `images` (a folder) or `documents` (a file)")
    if spec.images is not None:
        folder = Path(spec.images)
        if not folder.is_dir():
            raise ConfigError(f"data.prompts.images: {folder} is not a folder")
        if spec.prompt.count(MEDIA_TOKEN) != 1:
            raise ConfigError(f"data.prompts.prompt must hold one {MEDIA_TOKEN} mark, got {spec.prompt!r}")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ConfigError(f"data.prompts.images: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
        return [{"key": p.name, "text": spec.prompt, "images": [p]} for p in files]
    path = Path(spec.documents)
    if not path.is_file():
        raise ConfigError(f"data.prompts.documents: {path} does not exist")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        docs = yaml.safe_load(path.read_text())
    else:
        docs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not isinstance(docs, list):
        raise ConfigError(f"data.prompts.documents: {path} must hold a list of documents")
    out = []
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
            raise DataError(f"{path} document {i}: needs a 'text' string (and 'images': a list of paths)")
        images = [path.parent / p for p in doc.get("images", [])]
        marks = doc["text"].count(MEDIA_TOKEN)
        if marks != len(images):
            raise DataError(f"{path} document {i}: {marks} {MEDIA_TOKEN} mark(s) but {len(images)} image(s)")
        out.append({"key": str(doc.get("key", i)), "text": doc["text"], "images": images})
    return out


class PromptDataset(torch.utils.data.Dataset):
    """The prompts with their images loaded by ``transform`` (PIL image → tensor)."""

    def __init__(self, prompts: list[dict], transform) -> None:
        self.prompts, self.transform = prompts, transform

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        item = self.prompts[i]
        images, error = [], None
        for path in item["images"]:
            try:
                with Image.open(path) as im:
                    images.append(self.transform(im.convert("RGB")))
            except (OSError, ValueError) as e:
                error = f"cannot read image {path}: {type(e).__name__}: {e}"
                break
        return {"key": item["key"], "text": item["text"], "images": images, "error": error}


def prompt_batch(texts: list[str], images: list[list[torch.Tensor]], tokenizer: Tokenizer) -> dict:
    """Tokenised open prompts: ``text_ids`` / ``text_mask`` (B, L) without the end token a
    tokenizer appends (BERT's [SEP]: the model continues the text), ``media_mask`` (B, L),
    ``images`` (B, M, 3, H, W) zero-padded with ``images_mask`` (B, M)."""
    media_id, _ = media_token_ids(tokenizer)
    enc = tokenizer(list(texts))
    ids, mask = enc["input_ids"].clone(), enc["attention_mask"].bool().clone()
    empty = tokenizer([""])["input_ids"][0]
    end = int(empty[-1]) if len(empty) >= 2 else None  # a tokenizer that closes every text
    if end is not None:
        last = mask.long().sum(1) - 1  # (B,)
        rows = torch.arange(len(ids))
        ends = ids[rows, last] == end
        mask[rows[ends], last[ends]] = False
    media = (ids == media_id) & mask
    kept = media.sum(1)
    batch_images, images_mask = pad_images(images, kept)
    return {
        "text_ids": ids,
        "text_mask": mask,
        "media_mask": media,
        "images": batch_images,
        "images_mask": images_mask,
        "num_images": kept,
    }


class PromptCollate:
    """Collates :class:`PromptDataset` items into a :func:`prompt_batch` plus ``keys``,
    ``prompts``, ``errors`` and the decoding settings (``generation``)."""

    def __init__(self, tokenizer: Tokenizer, spec: Prompts) -> None:
        self.tokenizer, self.spec = tokenizer, spec

    def __call__(self, items: list[dict]) -> dict:
        good = [it for it in items if it["error"] is None]
        batch = prompt_batch([it["text"] for it in good], [it["images"] for it in good], self.tokenizer) if good else {}
        batch.update(
            modality="prompt",
            keys=[it["key"] for it in good],
            prompts=[it["text"] for it in good],
            errors=[{"key": it["key"], "prompt": it["text"], "error": it["error"]} for it in items if it["error"]],
            generation={
                "max_new_tokens": self.spec.max_new_tokens,
                "num_beams": self.spec.num_beams,
                "length_penalty": self.spec.length_penalty,
            },
        )
        return batch


def write_predictions(path: str | Path, records: list[dict]) -> Path:
    """One json line per record, in key order of arrival; → the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    errors = sum(1 for r in records if "error" in r)
    if errors:
        log.warning("%d of %d prompts could not be read (their lines in %s say why)", errors, len(records), path)
    return path
