"""Run by test_distributed_eval.py: evaluate tiny CLIP, ALBEF and METER models on this
rank's share of the batches (gloo when WORLD_SIZE > 1) and save rank 0's results."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS), str(TESTS.parent)]

from tests.models import test_albef, test_clip, test_meter  # noqa: E402
from vlp.objectives import VQA  # noqa: E402

ANSWERS = ["yes", "no", "red", "blue"]


def pair_batches() -> list[dict]:
    """Three pair batches with distinct image ids; the last has shorter captions (the gather
    pads texts across ranks)."""
    batches = [test_albef.batch(seed) for seed in range(3)]
    last = batches[-1]
    for key in ("text_ids", "text_mask", "mlm_input_ids", "mlm_labels"):
        last[key] = last[key][:, :5].contiguous()
    return batches


def vqa_batches() -> list[dict]:
    out = []
    for seed in range(3):
        b = dict(test_meter.task_batches()["vqa"])
        g = torch.Generator().manual_seed(seed)
        b["image"] = torch.randn(b["image"].shape, generator=g)
        b["answers"] = [[ANSWERS[(i + seed) % 4]] for i in range(len(b["answers"]))]
        out.append(b)
    return out


def models() -> dict:
    albef = test_albef.tiny_albef()
    albef.rerank_k = 3
    return {
        "clip": (test_clip.tiny_clip(), pair_batches()),
        "albef": (albef, pair_batches()),
        "meter_itm": (test_meter.tiny_meter(), [dict(b, modality="pair") for b in pair_batches()]),
        "meter_vqa": (test_meter.tiny_meter(objectives=[VQA(answers=ANSWERS, question_types=["a"])]), vqa_batches()),
    }


def main(out: str, split: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    # uneven: rank 0 gets two batches and rank 1 one ("uneven"), or rank 1 none ("empty")
    shares = {"uneven": [[0, 1], [2]], "empty": [[0, 1, 2], []]}[split] if world > 1 else [[0, 1, 2]]
    results = {}
    for name, (model, batches) in models().items():
        model.eval()
        mine = [batches[i] for i in shares[rank]]
        results[name] = model.evaluate(mine, modality=batches[0]["modality"])
    if rank == 0:
        torch.save(results, out)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
