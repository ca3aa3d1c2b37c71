"""From tar shards to collated batches, one modality at a time.

``read_shards`` streams raw samples; ``SampleDecoder`` turns each into an example dict
or a :class:`Skipped` marker (undecodable image, empty caption, missing field, a label
out of range, broken shard); ``batches`` groups examples and hands the skip markers along with the batch, so
skips made inside DataLoader workers are counted by the main process
(see ``WebDataModule.on_before_batch_transfer``). Nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from webdataset import tariterators

from vlp.data.transforms import ImageDecodeError, decode_image

IMAGE_MARK = "<image>"
#: Label names by index: NLVR2 (false/true) and SNLI-VE (the order SNLI lists them in;
#: LAVIS uses the reverse). ``json.label`` may be the index or the name.
LABELS = {"nlvr2": ("false", "true"), "ve": ("entailment", "neutral", "contradiction")}


@dataclass(frozen=True)
class Skipped:
    """A sample (or shard) that could not be used, and why."""

    key: str
    reason: str


def read_shards(urls: Iterable[str]) -> Iterator[dict | Skipped]:
    """Raw webdataset samples from ``urls``; a shard that breaks mid-way becomes a Skipped."""
    errors: list[Exception] = []

    def handler(exn: Exception) -> bool:
        errors.append(exn)
        return True  # continue with the next shard

    for url in urls:
        yield from tariterators.tarfile_samples([{"url": url}], handler=handler)
        for exn in errors:
            yield Skipped(f"shard {url}", f"unreadable shard ({type(exn).__name__}: {exn.args[0] if exn.args else ''})")
        errors.clear()


def stable_id(value) -> int:
    """An int64 id from an int-like value or a stable hash of a string key."""
    if isinstance(value, int):
        return value
    text = str(value)
    if text.isdigit() and len(text) < 19:
        return int(text)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


class SampleDecoder:
    """Raw sample → example dict for one modality (see docs/data.md for the keys).

    Args:
        modality: pair | image | text | vqa | retrieval | interleaved | nlvr2 | ve.
        fields: role → ";"-separated tar extensions (manifest ``fields``).
        transform: PIL image → tensor.
    """

    def __init__(self, modality: str, fields: dict[str, str], transform: Callable | None) -> None:
        self.modality = modality
        self.image_exts = fields["image"].split(";")
        self.text_ext, self.json_ext, self.label_ext = fields["text"], fields["json"], fields["label"]
        self.transform = transform
        self._decode = {
            "pair": self._pair,
            "image": self._image_modality,
            "text": self._text_modality,
            "vqa": self._vqa,
            "retrieval": self._retrieval,
            "interleaved": self._interleaved,
            "nlvr2": self._nlvr2,
            "ve": self._ve,
        }[modality]

    def __call__(self, sample: dict | Skipped) -> dict | Skipped:
        if isinstance(sample, Skipped):
            return sample
        key = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        try:
            return self._decode(sample, key)
        except _Skip as s:
            return Skipped(key, str(s))

    # -- fields ---------------------------------------------------------------------------
    def _image(self, sample: dict, exts: list[str] | None = None) -> torch.Tensor:
        for ext in exts or self.image_exts:
            if ext in sample:
                try:
                    return self.transform(decode_image(sample[ext]))
                except ImageDecodeError as e:
                    raise _Skip(f"corrupt image ({e})") from None
        raise _Skip(f"no image field (looked for {'/'.join(exts or self.image_exts)})")

    def _json(self, sample: dict, required: bool = False) -> dict:
        if self.json_ext not in sample:
            if required:
                raise _Skip(f"no {self.json_ext} field")
            return {}
        try:
            return json.loads(sample[self.json_ext])
        except (ValueError, UnicodeDecodeError) as e:
            raise _Skip(f"invalid json ({e})") from None

    def _text(self, sample: dict) -> str:
        if self.text_ext not in sample:
            raise _Skip(f"no {self.text_ext} field")
        text = _clean(sample[self.text_ext].decode("utf-8", errors="replace"))
        if not text:
            raise _Skip("empty caption")
        return text

    def _image_id(self, sample: dict, meta: dict) -> int:
        return stable_id(meta.get("image_id", f"{sample.get('__url__')}:{sample.get('__key__')}"))

    def _sentence(self, meta: dict, field: str) -> str:
        text = _clean(str(meta.get(field) or ""))
        if not text:
            raise _Skip(f"empty {field}")
        return text

    def _label(self, meta: dict) -> int:
        """``json.label`` as an index into ``LABELS[modality]``: an int, a digit string, a
        label name (any case) or, for NLVR2, a boolean."""
        names = LABELS[self.modality]
        if "label" not in meta:
            raise _Skip(f"no label in {self.json_ext}")
        value = meta["label"]
        if isinstance(value, bool) and len(names) == 2:
            return int(value)
        if isinstance(value, str):
            text = value.strip().lower()
            if text in names:
                return names.index(text)
            value = int(text) if text.lstrip("-").isdigit() else value
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
            return value
        raise _Skip(
            f"label out of range (got {value!r}; {self.modality} labels are 0..{len(names) - 1} or {'/'.join(names)})"
        )

    # -- modalities -----------------------------------------------------------------------
    def _pair(self, sample: dict, key: str) -> dict:
        meta = self._json(sample)
        text = self._text(sample)
        return {"image": self._image(sample), "text": text, "image_id": self._image_id(sample, meta), "key": key}

    def _image_modality(self, sample: dict, key: str) -> dict:
        if self.label_ext not in sample:
            raise _Skip(f"no {self.label_ext} field")
        try:
            label = int(sample[self.label_ext].decode().strip())
        except ValueError:
            raise _Skip(f"label is not an integer: {sample[self.label_ext][:20]!r}") from None
        return {"image": self._image(sample), "label": label, "key": key}

    def _text_modality(self, sample: dict, key: str) -> dict:
        return {"text": self._text(sample), "key": key}

    def _vqa(self, sample: dict, key: str) -> dict:
        meta = self._json(sample, required=True)
        question = _clean(str(meta.get("question", "")))
        if not question:
            raise _Skip("empty question")
        answers = [_clean(str(a)) for a in meta.get("answers", [])]
        return {
            "image": self._image(sample),
            "text": question,
            "answers": [a for a in answers if a],
            "question_type": meta.get("question_type", ""),
            "image_id": self._image_id(sample, meta),
            "key": key,
        }

    def _retrieval(self, sample: dict, key: str) -> dict:
        meta = self._json(sample, required=True)
        captions = [_clean(str(c)) for c in meta.get("captions", [])]
        kept = [c for c in captions if c]
        if not kept:
            raise _Skip("no non-empty captions")
        example = {"image": self._image(sample), "captions": kept, "image_id": self._image_id(sample, meta), "key": key}
        if len(kept) < len(captions):  # counted like a skip: the protocol changes
            example["dropped"] = Skipped(key, f"empty caption ({len(captions) - len(kept)} of {len(captions)} dropped)")
        return example

    def _interleaved(self, sample: dict, key: str) -> dict:
        meta = self._json(sample, required=True)
        text = _clean(str(meta.get("text", "")))
        n = text.count(IMAGE_MARK)
        if n == 0:
            raise _Skip(f"interleaved text has no {IMAGE_MARK} mark")
        images = [self._image(sample, [f"{i}.{ext}" for ext in self.image_exts]) for i in range(n)]
        return {"text": text, "images": images, "key": key}

    def _nlvr2(self, sample: dict, key: str) -> dict:
        meta = self._json(sample, required=True)
        sides = {side: [f"{side}.{ext}" for ext in self.image_exts] for side in ("left", "right")}
        for side, exts in sides.items():  # before decoding anything
            if not any(ext in sample for ext in exts):
                raise _Skip(f"no {side} image (looked for {'/'.join(exts)})")
        sentence, label = self._sentence(meta, "sentence"), self._label(meta)
        return {
            "image": self._image(sample, sides["left"]),
            "image2": self._image(sample, sides["right"]),
            "text": sentence,
            "label": label,
            "template": str(meta.get("template", "")),
            "image_id": stable_id(meta.get("image_id", meta.get("id", key))),
            "key": key,
        }

    def _ve(self, sample: dict, key: str) -> dict:
        meta = self._json(sample, required=True)
        hypothesis, label = self._sentence(meta, "hypothesis"), self._label(meta)
        return {
            "image": self._image(sample),
            "text": hypothesis,
            "label": label,
            "image_id": self._image_id(sample, meta),
            "key": key,
        }


class _Skip(Exception):
    pass
