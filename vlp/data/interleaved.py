"""Interleaved image-text documents (MMC4 / M3W style) as Flamingo trains on them.

A document's text marks each image with ``<image>``; the text after a mark, up to the next
one, is that image's chunk. :func:`media_text` closes every chunk with ``<|endofchunk|>``
(OpenFlamingo's format), and :func:`interleaved_batch` tokenises the documents with both as
single special tokens and adds what the model and its LM loss need:

| key | shape | meaning |
|---|---|---|
| ``images`` | (B, M, 3, H, W) | the documents' images, zero-padded to the most kept images M |
| ``images_mask`` | (B, M) bool | True for a real image (False for padding) |
| ``num_images`` | (B,) | images kept per document |
| ``text_ids`` / ``text_mask`` | (B, L) | tokens with ``<image>`` = the media token id |
| ``media_mask`` | (B, L) bool | True at the media tokens |
| ``lm_labels`` | (B, L) | next-token targets, already shifted: the loss at position t is ``CE(logits[:, t], lm_labels[:, t])``; -100 at padding, at media tokens, at text before the first image and at the last position |

A text cut by the tokenizer's ``max_length`` keeps the images whose media token survived
(the others are dropped with their token, as the text after the cut is). A document left
with no target at all (every ``lm_labels`` entry -100) is removed from the batch by
:class:`~vlp.data.collate.Collator` and counted as a skip ("no trainable token"). MMC4's own
json layout becomes such a document in :mod:`vlp.data.mmc4`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vlp.data.tokenization import Tokenizer
from vlp.errors import ConfigError, DataError

MEDIA_TOKEN = "<image>"
END_OF_CHUNK = "<|endofchunk|>"
#: Special tokens an interleaved tokenizer needs (``HFTokenizer(special_tokens=...)``).
MEDIA_TOKENS = (MEDIA_TOKEN, END_OF_CHUNK)
IGNORE = -100


def media_text(text: str, num_images: int, key: str) -> str:
    """``text`` with ``<|endofchunk|>`` after each image's chunk (a chunk that already ends
    with one keeps it), the chunks stripped and joined without spaces:
    ``"Intro <image> a cat. <image> a dog."`` → ``"Intro<image>a cat.<|endofchunk|><image>a dog.<|endofchunk|>"``.
    DataError naming ``key`` when the ``<image>`` marks and the
    images differ in number."""
    marks = text.count(MEDIA_TOKEN)
    if marks != num_images:
        raise DataError(
            f"interleaved document {key}: {marks} {MEDIA_TOKEN} mark(s) but {num_images} image(s); "
            "each image needs exactly one mark"
        )
    before, *chunks = text.split(MEDIA_TOKEN)
    out = [before.strip()]
    for chunk in chunks:
        chunk = chunk.strip()
        if chunk.endswith(END_OF_CHUNK):
            chunk = chunk[: -len(END_OF_CHUNK)].rstrip()
        out.append(f"{MEDIA_TOKEN}{chunk}{END_OF_CHUNK}")
    return "".join(out)  # no spaces around special tokens: a BPE would spend a token on each


def media_token_ids(tokenizer: Tokenizer) -> tuple[int, int]:
    """Ids of ``<image>`` and ``<|endofchunk|>``; a ConfigError says how to add them."""
    try:
        return tokenizer.token_id(MEDIA_TOKEN), tokenizer.token_id(END_OF_CHUNK)
    except (ConfigError, NotImplementedError):
        raise ConfigError(
            f"interleaved documents need the special tokens {list(MEDIA_TOKENS)} in the tokenizer: "
            f"set special_tokens: {list(MEDIA_TOKENS)} in its init_args ({type(tokenizer).__name__})"
        ) from None


def lm_labels(ids: torch.Tensor, mask: torch.Tensor, media: torch.Tensor) -> torch.Tensor:
    """Next-token targets (B, L) for ids (B, L): ``labels[:, t] = ids[:, t + 1]``, -100 where
    that token is padding, a media token, or before the first media token of its row
    (OpenFlamingo's choice: text with no image to look at is no target), and at t = L - 1."""
    target = ids.masked_fill(~mask.bool() | media, IGNORE)  # (B, L)
    target = target.masked_fill(media.cumsum(dim=1) == 0, IGNORE)  # before the first image
    return shift_targets(target)


def shift_targets(target: torch.Tensor) -> torch.Tensor:
    """(B, L) per-token targets → next-token labels: ``labels[:, t] = target[:, t + 1]``,
    -100 at the last position."""
    labels = torch.full_like(target, IGNORE)
    labels[:, :-1] = target[:, 1:]
    return labels


def pad_images(images: Sequence[Sequence[torch.Tensor]], kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``kept[i]`` images of each document stacked and zero-padded → (B, M, 3, H, W)
    and the mask of the real ones (B, M), M the most kept (at least 1; documents without an
    image give one empty uint8 slot)."""
    first = next((doc[0] for doc in images if len(doc)), None)
    m = max(1, int(kept.max()) if len(kept) else 1)
    if first is None:
        batch = torch.zeros(len(images), m, 3, 1, 1, dtype=torch.uint8)
    else:
        batch = first.new_zeros(len(images), m, *first.shape)  # (B, M, 3, H, W)
    for i, doc in enumerate(images):
        k = min(int(kept[i]), len(doc))
        if k:
            batch[i, :k] = torch.stack(list(doc[:k]))
    return batch, torch.arange(m)[None, :] < kept[:, None]


def interleaved_batch(
    texts: Sequence[str], images: Sequence[Sequence[torch.Tensor]], keys: Sequence[str], tokenizer: Tokenizer
) -> dict:
    """The batch keys of interleaved documents (see the module docstring)."""
    media_id, _ = media_token_ids(tokenizer)
    docs = [media_text(t, len(im), k) for t, im, k in zip(texts, images, keys, strict=True)]
    enc = tokenizer(docs)
    ids, mask = enc["input_ids"], enc["attention_mask"]  # (B, L)
    media = (ids == media_id) & mask.bool()  # (B, L)
    kept = media.sum(dim=1)  # (B,) images whose token survived truncation
    batch, images_mask = pad_images(images, kept)
    return {
        "images": batch,
        "images_mask": images_mask,
        "num_images": kept,
        "text_ids": ids,
        "text_mask": mask,
        "media_mask": media,
        "lm_labels": lm_labels(ids, mask, media),
    }
