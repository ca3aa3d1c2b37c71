"""From tar shards to collated batches, one modality at a time.

``read_shards`` streams raw samples; ``SampleDecoder`` turns each into an example dict
or a :class:`Skipped` marker (undecodable image, empty or non-UTF-8 caption, missing field,
a label out of range, broken shard); ``batches`` groups examples and hands the skip markers
along with the batch, so skips made inside DataLoader workers are counted by the main process
(see ``WebDataModule.on_before_batch_transfer``). Nothing is dropped silently: a shard that
cannot be read counts as the samples it should have held.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from vlp.data.mmc4 import MMC4Error, MMC4Options, check_document, document_text, plan_document
from vlp.data.transforms import ImageDecodeError, decode_image, split_views

IMAGE_MARK = "<image>"
#: Label names by index: NLVR2 (false/true) and SNLI-VE (the order SNLI lists them in;
#: LAVIS uses the reverse). ``json.label`` may be the index or the name.
LABELS = {
    "nlvr2": ("false", "true"),
    "ve": ("entailment", "neutral", "contradiction"),
    "pair_cls": ("negative", "positive"),
}
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's per-shard metadata members


@dataclass(frozen=True)
class Skipped:
    """Samples that could not be used, and why.

    ``count`` is how many samples the record stands for: 1 for a bad sample, the samples a
    broken shard should still have held (``shard`` is then its url), the captions dropped
    from a retrieval sample.
    """

    key: str
    reason: str
    count: int = 1
    shard: str | None = None


def skipped_count(skipped: Iterable[Skipped]) -> int:
    """Samples the skip records stand for (the sum of their ``count``)."""
    return sum(s.count for s in skipped)


def _tar_samples(url: str) -> Iterator[dict | Skipped]:
    """Samples of one tar, grouped by key as webdataset groups them; any read error is
    raised, and the sample being assembled when it happens is never yielded."""
    stream = gopen(url)
    try:
        current: dict | None = None
        tar = tarfile.open(fileobj=stream, mode="r|*")
        for info in tar:
            if not info.isreg() or _META.match(info.name):
                continue
            prefix, suffix = base_plus_ext(info.name)
            if prefix is None:
                continue
            data = tar.extractfile(info).read()
            tar.members = []  # streaming: keep no member list
            suffix = suffix.lower()
            if current is None or prefix != current["__key__"]:
                if current is not None:
                    yield current.pop("__bad__", None) or current
                current = {"__key__": prefix, "__url__": url}
            if suffix in current:
                current["__bad__"] = Skipped(f"{url}:{prefix}", f"duplicate file {info.name} in the shard")
            current[suffix] = data
        if current is not None:
            yield current.pop("__bad__", None) or current
    finally:
        stream.close()


def read_shards(
    urls: Iterable[str], shard_sizes: Mapping[str, int] | None = None, exact: bool = False
) -> Iterator[dict | Skipped]:
    """Raw webdataset samples from ``urls``.

    A shard that cannot be opened or breaks mid-way yields the complete samples read before
    the break, then one :class:`Skipped` for the rest: ``shard_sizes[url]`` (the samples the
    shard should hold) minus those yielded, and at least 1. The sample being read when the
    shard broke is part of that count, never yielded. With ``exact`` sizes (the manifest's
    ``shard_sizes``), a shard that ends cleanly but short (a tar cut on a member boundary)
    is one such Skipped too, for the samples it lacks.
    """
    sizes = shard_sizes or {}
    for url in urls:
        done = 0
        try:
            for sample in _tar_samples(url):
                done += 1
                yield sample
        except Exception as e:  # gopen, tarfile and pipes raise many types
            lost = max(1, sizes.get(url, 1) - done)
            yield Skipped(
                f"shard {url}",
                f"unreadable shard ({type(e).__name__}: {e}; {lost} sample(s) lost after {done} read)",
                count=lost,
                shard=url,
            )
            continue
        if exact and done < sizes.get(url, 0):
            lost = sizes[url] - done
            yield Skipped(
                f"shard {url}",
                f"short shard ({done} of the {sizes[url]} samples the manifest lists; {lost} lost)",
                count=lost,
                shard=url,
            )


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


def _utf8(data: bytes, what: str) -> str:
    """Strict UTF-8 (a leading BOM is dropped); other bytes are a skip naming the first bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _Skip(f"{what} is not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})") from None


class SampleDecoder:
    """Raw sample → example dict for one modality (see docs/data.md for the keys).

    Args:
        modality: pair | image | text | vqa | retrieval | interleaved | nlvr2 | ve | text_pair.
        fields: role → ";"-separated tar extensions (manifest ``fields``).
        transform: PIL image → tensor.
        mmc4: options of interleaved documents in MMC4's layout (``text_list``,
            ``image_info``, ``similarity_matrix``), see :class:`~vlp.data.mmc4.MMC4Options`.
    """

    def __init__(
        self,
        modality: str,
        fields: dict[str, str],
        transform: Callable | None,
        mmc4: MMC4Options | Mapping | None = None,
    ) -> None:
        self.modality = modality
        self.mmc4 = mmc4 if isinstance(mmc4, MMC4Options) else MMC4Options.parse(mmc4)
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
            "text_pair": self._text_pair,
            "pair_cls": self._pair_cls,
        }[modality]

    def __call__(self, sample: dict | Skipped) -> dict | Skipped:
        if isinstance(sample, Skipped):
            return sample
        key = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        try:
            return split_views(self._decode(sample, key))  # several views: image, image_<name>
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
        text = _utf8(sample[self.json_ext], self.json_ext)
        try:
            return json.loads(text)
        except ValueError as e:
            raise _Skip(f"invalid json ({e})") from None

    def _text(self, sample: dict) -> str:
        if self.text_ext not in sample:
            raise _Skip(f"no {self.text_ext} field")
        text = _clean(_utf8(sample[self.text_ext], "caption"))
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
            label = int(_utf8(sample[self.label_ext], f"{self.label_ext} label").strip())
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
            lost = len(captions) - len(kept)
            example["dropped"] = Skipped(key, f"empty caption ({lost} of {len(captions)} dropped)", count=lost)
        return example

    def _interleaved(self, sample: dict, key: str) -> dict:
        meta = self._json(sample, required=True)
        if "text_list" in meta:
            return self._mmc4_document(sample, meta, key)
        text = _clean(str(meta.get("text", "")))
        n = text.count(IMAGE_MARK)
        if n == 0:
            raise _Skip(f"interleaved text has no {IMAGE_MARK} mark")
        found = len(
            {k.split(".")[0] for k in sample if re.fullmatch(r"\d+\.[^.]+", k) and k.split(".")[1] in self.image_exts}
        )
        if found != n:  # counted like any bad sample; past max_skip_fraction the run stops
            raise _Skip(f"{n} {IMAGE_MARK} mark(s) but {found} image(s) in the interleaved document")
        images = [self._image(sample, [f"{i}.{ext}" for ext in self.image_exts]) for i in range(n)]
        return {"text": text, "images": images, "key": key}

    def _mmc4_bytes(self, sample: dict, j: int, info: Mapping) -> bytes | None:
        """Image ``j`` of an MMC4 document: base64 in the json (OpenFlamingo's shards), else the
        member ``<j>.<ext>``, else the member named by its ``image_name``; None when absent."""
        if "image_base64" in info:
            try:
                return base64.b64decode(str(info["image_base64"]), validate=True)
            except (binascii.Error, ValueError):
                return b""  # not base64: decoding it fails as a corrupt image
        for ext in self.image_exts:
            if f"{j}.{ext}" in sample:
                return sample[f"{j}.{ext}"]
        name = str(info.get("image_name", "")).lower()
        return sample.get(name) if name else None

    def _mmc4_document(self, sample: dict, meta: dict, key: str) -> dict:
        """An MMC4 json → the interleaved example (vlp.data.mmc4); every dropped image is a
        skip record under ``example["dropped"]``, a dropped document a skip."""
        opts = self.mmc4
        try:
            sentences, infos, sim = check_document(meta)
        except MMC4Error as e:
            raise _Skip(str(e)) from None
        data = [self._mmc4_bytes(sample, j, info) for j, info in enumerate(infos)]
        plan = plan_document(sim, [d is not None for d in data], opts)
        images, marked = [], []
        for j, s in zip(plan.images, plan.sentences, strict=True):
            try:
                images.append(self.transform(decode_image(data[j])))
                marked.append(s)
            except ImageDecodeError:
                plan.dropped["corrupt"] += 1  # its sentence goes without an image
        dropped = ", ".join(f"{n} {why}" for why, n in sorted(plan.dropped.items()))
        if len(images) < opts.min_num_images:
            raise _Skip(
                f"mmc4 document with too few images ({len(images)} kept of {len(infos)}, min_num_images="
                f"{opts.min_num_images}; dropped: {dropped or 'none'})"
            )
        example = {"text": document_text(sentences, marked), "images": images, "key": key}
        if plan.dropped:  # counted like retrieval's dropped captions: one per image
            example["dropped"] = [
                Skipped(key, f"mmc4 image {why} ({n} of {len(infos)} in the document)", count=n)
                for why, n in sorted(plan.dropped.items())
            ]
        return example

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

    def _pair_cls(self, sample: dict, key: str) -> dict:
        """Binary classification of an (image, text) pair (Hateful Memes: ``json`` {text,
        label}, 1 = hateful); the text may also come from the ``txt`` field."""
        meta = self._json(sample, required=True)
        text = self._sentence(meta, "text") if "text" in meta else self._text(sample)
        return {
            "image": self._image(sample),
            "text": text,
            "label": self._label(meta),
            "image_id": self._image_id(sample, meta),
            "key": key,
        }

    def _text_pair(self, sample: dict, key: str) -> dict:
        """``json`` {text, text_b (absent for single sentences), label}: an integer class or a
        float score (STS-B); a sample without a label (a GLUE test file) is a skip."""
        meta = self._json(sample, required=True)
        text = self._sentence(meta, "text")
        text_b = self._sentence(meta, "text_b") if "text_b" in meta else None
        label = meta.get("label")
        if label is None:
            raise _Skip(f"no label in {self.json_ext} (an unlabelled test split cannot be trained or evaluated)")
        if (
            isinstance(label, bool)
            or not isinstance(label, int | float)
            or label != label
            or abs(label) == float("inf")
        ):
            raise _Skip(f"label must be an integer class or a finite score, got {label!r}")
        return {"text": text, "text_b": text_b, "label": label, "key": key}


class _Skip(Exception):
    pass
