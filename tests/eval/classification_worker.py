"""Run by test_zeroshot.py: zero-shot + linear-probe scores of a tiny CLIP on this rank's
share of image batches and of the probe's training batches (gloo when WORLD_SIZE > 1);
rank 0 saves the result record."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS), str(TESTS.parent)]

from tests.models import test_clip  # noqa: E402

CLASSES = ["red", "green", "blue", "cyan", "pink", "gold"]
TEMPLATES = ["a {} thing.", "the {}."]


class HashTokenizer:
    """Words → ids 1..vocab-1 by a fixed hash; padded to the longest text."""

    def __init__(self, vocab: int = test_clip.VOCAB) -> None:
        self.vocab = vocab

    def __call__(self, texts: list[str]) -> dict:
        rows = [[1 + sum(map(ord, w)) % (self.vocab - 1) for w in t.split()] for t in texts]
        n = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (n - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": mask}


def image_batches(seed: int, sizes: list[int]) -> list[dict]:
    g, out, start = torch.Generator().manual_seed(seed), [], 0
    for n in sizes:
        labels = torch.arange(start, start + n) % len(CLASSES)
        image = torch.randn(n, 3, 32, 32, generator=g) + labels.view(-1, 1, 1, 1) * 0.3
        out.append(
            {
                "modality": "image",
                "image": image,
                "label": labels,
                "keys": [f"{seed}-{start + i:04d}" for i in range(n)],
            }
        )
        start += n
    return out


def main(out: str, split: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    test, train = image_batches(0, [8, 6, 4]), image_batches(1, [12, 10, 8])
    shares = {"uneven": [[0, 1], [2]], "empty": [[0, 1, 2], []]}[split] if world > 1 else [[0, 1, 2]]
    model = test_clip.tiny_clip().eval()
    result = model.evaluate(
        [test[i] for i in shares[rank]],
        modality="image",
        options={"classes": CLASSES, "templates": TEMPLATES, "probe_l2": [1e-3, 1e-1]},
        tokenizer=HashTokenizer(),
        probe_train=[train[i] for i in shares[::-1][rank]],  # the other share: another split of ranks
    )
    if rank == 0:
        torch.save(result, out)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
