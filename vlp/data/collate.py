"""Collate examples of one modality into a batch dict (tokenising text on the way).

Batch keys (see docs/data.md):

| key | shape | modalities |
|---|---|---|
| ``image`` | (B, 3, H, W) | pair, image, vqa, retrieval, nlvr2 (left image), ve |
| ``image2`` | (B, 3, H, W) | nlvr2 (right image) |
| ``image_<name>`` / ``image2_<name>`` | (B, 3, h, w) | a view declared in ``views`` (e.g. ``image_codebook``) |
| ``image_id`` | (B,) int64 | pair, vqa, retrieval, nlvr2 (pair id), ve |
| ``text_ids`` / ``text_mask`` | (T, L) | pair, text, vqa (question), retrieval (T = all captions), interleaved, nlvr2 (sentence), ve (hypothesis) |
| ``text_image_id`` | (T,) | pair, retrieval: the image each text belongs to |
| ``label`` | (B,) int64 | image (class), nlvr2 (0 false, 1 true), ve (0 entailment, 1 neutral, 2 contradiction) |
| ``answers`` / ``question_type`` | lists | vqa |
| ``task_type`` | list[str] | nlvr2: the sentence template ("" when unknown) |
| ``images`` / ``images_mask`` / ``num_images`` | (B, M, 3, H, W) / (B, M) bool / (B,) | interleaved (zero-padded) |
| ``media_mask`` / ``lm_labels`` | (B, L) bool / (B, L) | interleaved: ``<image>`` positions, shifted next-token targets (-100 = none) |
| ``images`` ... ``lm_labels`` | as interleaved | pair with ``pair_format="interleaved"``: one-image documents ``<image>caption<|endofchunk|>`` (no ``image`` key; ``image_id`` / ``text_image_id`` kept) |
| ``text_pair_ids`` / ``text_pair_mask`` | (B, L) | text_pair: the sentence, or the pair as one sequence ("a [SEP] b") |
| ``text_pair_types`` | (B, L) int64 | text_pair with pairs, when the tokenizer gives token types (0 a, 1 b) |
| ``label`` | (B,) int64 or float | text_pair: a class, or a score (STS-B) when any label of the batch is a float |

Image tensors are uint8 when the DataModule normalises on the device
(``WebDataModule.finish_batch`` normalises every key of ``IMAGE_KEYS``).

Documents (interleaved, or pairs as documents) whose ``lm_labels`` are all -100 (truncated
before the text after their first image) leave the batch as skips ("no trainable token");
when none is left the batch has ``keys == []`` and :func:`batches` passes its skip records on
to the next batch instead of yielding it.

Every batch also has ``modality``, ``keys`` and ``skipped`` (a list of
:class:`~vlp.data.pipeline.Skipped` from the stream since the previous batch; each stands
for ``count`` samples), and the last batch of a finite stream has ``end_of_stream``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from torch.utils.data import get_worker_info

from vlp.data.interleaved import IGNORE, MEDIA_TOKEN, interleaved_batch
from vlp.data.pipeline import Skipped, skipped_count
from vlp.data.tokenization import Tokenizer
from vlp.errors import ConfigError, DataError

#: Batch keys holding one (B, 3, H, W) image per example.
IMAGE_KEYS = ("image", "image2")
#: How pair examples are collated: image + caption, or one-image Flamingo documents.
PAIR_FORMATS = ("caption", "interleaved")


class Collator:
    """Examples → batch dict.

    Args:
        modality: the modality of the examples.
        tokenizer: used for every text field.
        maskers: callables ``(batch, tokenizer) -> batch`` adding masked inputs (MLM, MIM).
        pair_format: ``caption`` (pairs as image + caption) or ``interleaved``: each pair
            becomes the document ``<image>caption<|endofchunk|>``, collated with the keys of
            interleaved batches (``modality`` stays ``pair``).
    """

    def __init__(
        self, modality: str, tokenizer: Tokenizer | None, maskers: Sequence = (), pair_format: str = "caption"
    ) -> None:
        if pair_format not in PAIR_FORMATS:
            raise ConfigError(f"pair_format must be one of {', '.join(PAIR_FORMATS)}, got {pair_format!r}")
        if pair_format != "caption" and modality != "pair":
            raise ConfigError(f"pair_format={pair_format!r} applies to pair sources, not {modality!r}")
        self.modality = modality
        self.tokenizer = tokenizer
        self.maskers = list(maskers)
        self.pair_format = pair_format

    def _tokenize(self, batch: dict, texts: list[str]) -> None:
        if self.tokenizer is None:
            raise ValueError(f"a tokenizer is needed to collate {self.modality} batches")
        enc = self.tokenizer(texts)
        batch["text_ids"], batch["text_mask"] = enc["input_ids"], enc["attention_mask"]

    def __call__(self, examples: list[dict], skipped: list[Skipped] | None = None) -> dict:
        m = self.modality
        skipped = list(skipped or [])
        batch: dict = {"modality": m, "keys": [e["key"] for e in examples]}
        for key, value in examples[0].items():  # image, image2 and their views (image_<name>)
            if isinstance(value, torch.Tensor):
                batch[key] = torch.stack([e[key] for e in examples])  # (B, 3, H, W)
        if m in ("pair", "vqa", "retrieval", "nlvr2", "ve", "pair_cls"):
            batch["image_id"] = torch.tensor([e["image_id"] for e in examples], dtype=torch.long)
        documents = m == "interleaved" or self.pair_format == "interleaved"
        if m in ("pair", "text", "vqa", "nlvr2", "ve", "pair_cls") and not documents:
            self._tokenize(batch, [e["text"] for e in examples])
        if m in ("image", "nlvr2", "ve", "pair_cls"):
            batch["label"] = torch.tensor([e["label"] for e in examples], dtype=torch.long)
        if m == "pair":
            batch["text_image_id"] = batch["image_id"]
        elif m == "retrieval":
            captions = [c for e in examples for c in e["captions"]]
            self._tokenize(batch, captions)  # (T, L) with T = total captions
            batch["text_image_id"] = torch.tensor(
                [e["image_id"] for e in examples for _ in e["captions"]], dtype=torch.long
            )
            skipped += [e["dropped"] for e in examples if "dropped" in e]
        elif m == "nlvr2":
            batch["task_type"] = [e["template"] for e in examples]
        elif m == "vqa":
            batch["answers"] = [e["answers"] for e in examples]
            batch["question_type"] = [e["question_type"] for e in examples]
        elif m == "text_pair":
            batch.update(text_pair_batch(examples, self.tokenizer))
        if documents:  # images, images_mask, media_mask, lm_labels (vlp.data.interleaved)
            if self.tokenizer is None:
                raise ValueError(f"a tokenizer is needed to collate {m} batches as interleaved documents")
            if m == "pair":  # one-image documents; the stacked image becomes images[:, 0]
                texts, images = [f"{MEDIA_TOKEN}{e['text']}" for e in examples], [[im] for im in batch.pop("image")]
            else:
                texts, images = [e["text"] for e in examples], [e["images"] for e in examples]
                skipped += [d for e in examples for d in e.get("dropped", ())]
            batch.update(interleaved_batch(texts, images, batch["keys"], self.tokenizer))
            skipped += _drop_untrainable(batch)
            if not batch["keys"]:  # nothing left to learn from: batches() passes the skips on
                batch["skipped"] = skipped
                return batch
        for masker in self.maskers:
            batch = masker(batch, self.tokenizer)
        batch["skipped"] = skipped
        return batch


def _drop_untrainable(batch: dict) -> list[Skipped]:
    """Remove, in place, the documents whose ``lm_labels`` are all -100 (their text was cut
    before anything after their first image): a loss over no token is NaN. Every per-example
    tensor and ``keys`` lose their rows; returns one skip record per removed document."""
    keep = (batch["lm_labels"] != IGNORE).any(dim=1)  # (B,)
    if bool(keep.all()):
        return []
    keys, n = batch["keys"], len(batch["keys"])
    why = f"every lm_label is -100: nothing after its first {MEDIA_TOKEN} within {batch['text_ids'].shape[1]} tokens"
    dropped = [Skipped(k, f"no trainable token ({why})") for k, ok in zip(keys, keep.tolist(), strict=True) if not ok]
    for key, value in list(batch.items()):
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == n:
            batch[key] = value[keep]
        elif key == "keys":
            batch[key] = [k for k, ok in zip(keys, keep.tolist(), strict=True) if ok]
    m = max(1, int(batch["num_images"].max())) if batch["keys"] else 1
    batch["images"], batch["images_mask"] = batch["images"][:, :m], batch["images_mask"][:, :m]  # (B, M, ...)
    return dropped


def text_pair_batch(examples: list[dict], tokenizer: Tokenizer | None) -> dict:
    """``text_pair_ids`` / ``text_pair_mask`` (+ ``text_pair_types``) and ``label`` of
    ``text_pair`` examples: single sentences, or pairs encoded as one sequence."""
    if tokenizer is None:
        raise ValueError("a tokenizer is needed to collate text_pair batches")
    texts, seconds = [e["text"] for e in examples], [e["text_b"] for e in examples]
    paired = [b is not None for b in seconds]
    if any(paired) and not all(paired):
        keys = [e["key"] for e, p in zip(examples, paired, strict=True) if not p][:3]
        raise DataError(
            f"a text_pair batch mixes sentence pairs and single sentences (single: {keys}): give each "
            "kind of task its own modality group"
        )
    enc = tokenizer.pairs(texts, seconds) if all(paired) else tokenizer(texts)
    batch = {"text_pair_ids": enc["input_ids"], "text_pair_mask": enc["attention_mask"]}
    if enc.get("token_type_ids") is not None:
        batch["text_pair_types"] = enc["token_type_ids"]
    labels = [e["label"] for e in examples]
    dtype = torch.float if any(isinstance(v, float) for v in labels) else torch.long
    batch["label"] = torch.tensor(labels, dtype=dtype)
    return batch


#: Skip records without a single good sample after which a stream is given up as unreadable.
DEAD_STREAM_RECORDS = 10_000


def batches(examples: Iterable[dict | Skipped], batch_size: int, collate: Collator) -> Iterator[dict]:
    """Group examples into batches of ``batch_size``; skip markers ride along with a batch.

    The last, partial batch is emitted too, and skips seen after the last full batch are
    attached to the final batch, so no example or skip record is lost. The final batch of a
    stream that ends (evaluation) carries ``end_of_stream``: the number of DataLoader worker
    streams feeding its loader, so the main process knows when a loader is exhausted. A batch
    the collator emptied (no document with a trainable token) is not emitted: its skip records
    ride with the next batch. A stream
    in which every sample was skipped raises :class:`~vlp.errors.DataError` listing the reasons,
    and so does an endless (training) stream whose first ``DEAD_STREAM_RECORDS`` records are
    all skips.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    info = get_worker_info()
    streams = info.num_workers if info is not None else 1

    pending: dict | None = None  # the last collated batch: skips after it ride with the final one
    buffer: list[dict] = []
    skipped: list[Skipped] = []
    for example in examples:
        if isinstance(example, Skipped):
            skipped.append(example)
            if pending is None and not buffer and len(skipped) >= DEAD_STREAM_RECORDS:
                _all_skipped(skipped)
            continue
        buffer.append(example)
        if len(buffer) == batch_size:
            batch, buffer = collate(buffer, skipped), []
            skipped = [] if batch["keys"] else batch["skipped"]  # an emptied batch: its skips go on
            if batch["keys"]:
                if pending is not None:
                    yield pending
                pending = batch
    if buffer:
        batch = collate(buffer, skipped)
        skipped = [] if batch["keys"] else batch["skipped"]
        if batch["keys"]:
            if pending is not None:
                yield pending
            pending = batch
    if pending is None:
        if skipped:
            _all_skipped(skipped)
        return
    pending["skipped"] = pending["skipped"] + skipped
    pending["end_of_stream"] = streams
    yield pending


def _all_skipped(skipped: list[Skipped]) -> None:
    reasons = "\n  ".join(f"{s.key}: {s.reason}" for s in skipped[:10])
    raise DataError(
        f"all {skipped_count(skipped)} samples of this stream were skipped ({len(skipped)} records), e.g.:\n  {reasons}"
    )
