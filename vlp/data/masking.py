"""Masking for MLM (BERT 80/10/10) and MIM/MMM (BEiT block-wise or random patch masks).

Both are plain callables that add keys to a collated batch, so a recipe turns them on
by listing them in the DataModule's ``maskers``:

* :class:`MLMMasker` adds ``mlm_input_ids`` (B, L) and ``mlm_labels`` (B, L; -100 = not a target);
* :class:`PatchMasker` adds ``image_mask`` (B, h*w) bool, True = masked patch.

They run in DataLoader workers; randomness comes from torch's global generator, which the
training stream sets to a state seeded by (seed, epoch, rank, worker) while it makes a
batch (``vlp.data.stream``), or from an explicit generator in tests.
"""

from __future__ import annotations

import math
import random

import torch

from vlp.errors import ConfigError


class Masker:
    """Base class: ``masker(batch, tokenizer, generator=None) -> batch`` adds masked inputs."""

    def __call__(self, batch: dict, tokenizer=None, generator: torch.Generator | None = None) -> dict:
        raise NotImplementedError


def mask_tokens(
    input_ids: torch.Tensor,
    special_mask: torch.Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    mlm_probability: float = 0.15,
    replace_prob: float = 0.8,
    random_prob: float = 0.1,
    generator: torch.Generator | None = None,
    continuation: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: pick ``mlm_probability`` of the non-special tokens as targets; of those
    replace 80% by [MASK], 10% by a random token, keep 10%. Returns (masked_ids, labels).
    With ``continuation`` (B, L) bool (True: the token continues the previous word), whole
    words are picked: a word's first token is drawn and its pieces follow it."""
    probs = torch.full(input_ids.shape, mlm_probability)
    probs.masked_fill_(special_mask, 0.0)
    if continuation is not None:
        start = ~continuation | special_mask  # (B, L) each word's first token
        probs.masked_fill_(~start, 0.0)
    targets = torch.bernoulli(probs, generator=generator).bool()  # (B, L)
    if continuation is not None:
        position = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        first = torch.cummax(torch.where(start, position, 0), dim=1).values  # (B, L) its word's first token
        targets = targets.gather(1, first) & ~special_mask
    labels = input_ids.masked_fill(~targets, -100)
    # one uniform draw decides mask / random / keep, vectorised over the batch
    u = torch.rand(input_ids.shape, generator=generator)
    to_mask = targets & (u < replace_prob)
    to_random = targets & (u >= replace_prob) & (u < replace_prob + random_prob)
    masked = input_ids.clone()
    masked[to_mask] = mask_token_id
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, dtype=input_ids.dtype)
    masked[to_random] = random_ids[to_random]
    return masked, labels


class MLMMasker(Masker):
    """Adds BERT-style masked inputs/labels for the batch's text.

    Args:
        mlm_probability: fraction of (non-special) tokens that become targets.
        replace_prob / random_prob: of the targets, fraction set to [MASK] / a random token.
        whole_word: mask whole words (all WordPiece pieces of a picked word), with
            ``mlm_probability`` the fraction of words.
    """

    def __init__(
        self,
        mlm_probability: float = 0.15,
        replace_prob: float = 0.8,
        random_prob: float = 0.1,
        whole_word: bool = False,
    ) -> None:
        if not 0 < mlm_probability < 1 or replace_prob + random_prob > 1:
            raise ConfigError("MLMMasker: need 0 < mlm_probability < 1 and replace_prob + random_prob <= 1")
        self.mlm_probability = mlm_probability
        self.replace_prob = replace_prob
        self.random_prob = random_prob
        self.whole_word = whole_word

    def __call__(self, batch: dict, tokenizer, generator: torch.Generator | None = None) -> dict:
        if "text_ids" not in batch:
            return batch
        if tokenizer.mask_token_id is None:
            raise ConfigError(f"MLMMasker: tokenizer {type(tokenizer).__name__} has no [MASK] token")
        ids = batch["text_ids"]
        special = tokenizer.special_tokens_mask(ids) | (batch["text_mask"] == 0)
        batch["mlm_input_ids"], batch["mlm_labels"] = mask_tokens(
            ids,
            special,
            mask_token_id=tokenizer.mask_token_id,
            vocab_size=tokenizer.vocab_size,
            mlm_probability=self.mlm_probability,
            replace_prob=self.replace_prob,
            random_prob=self.random_prob,
            generator=generator,
            continuation=tokenizer.continuation_mask(ids) if self.whole_word else None,
        )
        return batch


def block_mask(
    height: int,
    width: int,
    num_masked: int,
    *,
    min_block: int = 4,
    max_block: int | None = None,
    min_aspect: float = 0.3,
    rng: random.Random,
) -> torch.Tensor:
    """BEiT block-wise masking on an (height, width) patch grid.

    Repeatedly masks rectangles of random area in [min_block, max_block] patches and
    aspect ratio in [min_aspect, 1/min_aspect] until about ``num_masked`` patches are
    masked. Returns (height * width,) bool, True = masked.
    """
    mask = torch.zeros(height, width, dtype=torch.bool)
    max_block = max_block or num_masked
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    count, stalls = 0, 0
    while count < num_masked and stalls < 10:
        budget = num_masked - count
        target = rng.uniform(min_block, max(min_block, min(max_block, budget)))
        aspect = math.exp(rng.uniform(*log_aspect))
        h = int(round(math.sqrt(target * aspect)))
        w = int(round(math.sqrt(target / aspect)))
        if not (0 < h <= height and 0 < w <= width):
            stalls += 1
            continue
        top, left = rng.randint(0, height - h), rng.randint(0, width - w)
        region = mask[top : top + h, left : left + w]
        new = int(h * w - region.sum())
        if 0 < new <= budget:
            region.fill_(True)
            count += new
            stalls = 0
        else:
            stalls += 1
    return mask.flatten()


class PatchMasker(Masker):
    """Adds ``image_mask`` (B, h*w) for masked image modelling.

    Args:
        grid: patch grid (h, w), e.g. (14, 14) for ViT-B/16 at 224 px.
        mask_ratio: fraction of patches to mask (BEiT/FLAVA: 0.4; MAE: 0.75).
        mode: "block" (BEiT block-wise) or "random" (uniform, exactly round(ratio*N) per image).
        min_block: smallest block (patches) for block-wise masking.
    """

    def __init__(
        self, grid: tuple[int, int], mask_ratio: float = 0.4, mode: str = "block", min_block: int = 16
    ) -> None:
        if mode not in ("block", "random"):
            raise ConfigError(f"PatchMasker: mode must be 'block' or 'random', got {mode!r}")
        if not 0 < mask_ratio < 1:
            raise ConfigError(f"PatchMasker: mask_ratio must be in (0, 1), got {mask_ratio}")
        self.grid = tuple(grid)
        self.mask_ratio = mask_ratio
        self.mode = mode
        self.min_block = min_block

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def __call__(self, batch: dict, tokenizer=None, generator: torch.Generator | None = None) -> dict:
        if "image" not in batch:
            return batch
        n = batch["image"].shape[0]
        num_masked = round(self.mask_ratio * self.num_patches)
        if self.mode == "random":
            noise = torch.rand(n, self.num_patches, generator=generator)  # (B, N)
            ranks = noise.argsort(dim=1).argsort(dim=1)
            batch["image_mask"] = ranks < num_masked
        else:
            seed = int(torch.randint(2**62, (1,), generator=generator))
            rng = random.Random(seed)
            min_block = min(self.min_block, num_masked)
            batch["image_mask"] = torch.stack(
                [block_mask(*self.grid, num_masked, min_block=min_block, rng=rng) for _ in range(n)]
            )
        return batch
