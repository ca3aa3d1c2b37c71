"""The text-task metrics reduce across ranks: 2 processes (gloo, CPU) with uneven shares, one
rank holding nothing, give the numbers of 1 process (confusion-matrix sums; concatenated
regression predictions for Spearman)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import free_port

WORKER = r"""
import json, sys, torch, torch.distributed as dist
from vlp.eval.text import TextClassificationMetrics, TextRegressionMetrics
rank, world, split, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
if world > 1:
    dist.init_process_group("gloo", rank=rank, world_size=world)
g = torch.Generator().manual_seed(0)
target = torch.randint(0, 2, (23,), generator=g)
pred = torch.where(torch.rand(23, generator=g) < 0.7, target, 1 - target)
gold = torch.rand(23, generator=g) * 5
score = gold + torch.randn(23, generator=g)
cut = {"uneven": 15, "empty": 23}[split] if world > 1 else 23
rows = slice(0, cut) if rank == 0 else slice(cut, 23)
cls, reg = TextClassificationMetrics(2, ("acc", "f1", "mcc")), TextRegressionMetrics()
if rows.stop > rows.start:
    cls.update(pred[rows], target[rows])
    reg.update(score[rows], gold[rows])
result = {**cls.compute(), **reg.compute()}
if rank == 0:
    json.dump(result, open(out, "w"))
"""


def _run(tmp_path, world: int, split: str) -> dict:
    out = tmp_path / f"{world}-{split}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(r), str(world), split, str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("split", ["uneven", "empty"])
def test_two_processes_give_the_numbers_of_one(tmp_path, split):
    one = _run(tmp_path, 1, split)
    assert set(one) == {"acc", "f1", "mcc", "pearson", "spearman"} and 50 < one["acc"] < 100
    assert _run(tmp_path, 2, split) == pytest.approx(one, abs=1e-9)
