"""Run by test_fewshot.py: few-shot captioning of a tiny Flamingo on this rank's share of
the query batches (gloo when WORLD_SIZE > 1), saving rank 0's result. On 2 ranks the shares
are uneven and rank 1 also holds a repeat of rank 0's first item (a sampler's padding)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parents[1])]

from tests.eval.fewshot_fixtures import flamingo, query_batches, tokenizer  # noqa: E402


def echo_nearest_caption(model, tok) -> None:
    """Make ``model.generate`` answer each prompt with its last demonstration's caption (with
    RICES: the most similar image's), after running the real search: scores far from zero that
    depend on which demonstrations each query got."""
    real = model.generate
    eoc, colon = tok.token_id("<|endofchunk|>"), tok([":"])["input_ids"][0][1].item()

    def generate(ids, mask, *args, **kwargs):
        real(ids, mask, *args, **kwargs)
        out = []
        for row, m in zip(ids, mask, strict=True):
            row = row[m.bool()].tolist()
            ends = [i for i, t in enumerate(row) if t == eoc]
            start = ends[-2] + 1 if len(ends) > 1 else 0
            demo = row[start : ends[-1]]
            out.append(demo[demo.index(colon) + 1 :])
        return out

    model.generate = generate


def evaluate(support: str, query: str, rank: int, world: int) -> dict:
    """Few-shot captioning (RICES, 0 and 2 shots) of this rank's share of the query items."""
    tok = tokenizer()
    model = flamingo(tok)
    echo_nearest_caption(model, tok)
    batches = query_batches(query, "retrieval", tok, batch_size=2)  # 2 + 2 + 1 items
    if world > 1:
        batches = [batches[0], batches[1]] if rank == 0 else [batches[2], batches[0]]  # batch 0 twice
    opts = {"support": {"manifest": support}, "shots": [0, 2], "max_new_tokens": 3, "num_beams": 2, "demos": "rices"}
    return model.evaluate(batches, modality="retrieval", options={"fewshot": opts}, tokenizer=tok)


def main(out: str, support: str, query: str) -> None:
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    result = evaluate(support, query, rank, world)
    if rank == 0:
        torch.save(result, out)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
