"""Evaluation gives the same numbers on 1 and 2 processes (gloo, CPU), with uneven shares:
ranks holding different numbers of batches, one rank holding none, captions of different
lengths. Covers retrieval (CLIP; ALBEF with ITM re-ranking and ITM accuracy), METER's
pretraining accuracies (ITM, MLM) and VQA accuracy. Before the evaluators, the gathers
assumed equal sizes (gloo: "Received data size doesn't match") and a rank without batches
never created its metric, leaving the other waiting."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import free_port

WORKER = Path(__file__).with_name("eval_worker.py")
TIMEOUT = 240


def _run(out: Path, split: str, world: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env["WORLD_SIZE"] = str(world)
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(out), split],
            env={**env, "RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=TIMEOUT)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a rank did not finish evaluating within {TIMEOUT} s (a collective left waiting)")
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    return _run(tmp_path_factory.mktemp("one") / "results.pt", "uneven", 1)


@pytest.mark.parametrize("split", ["uneven", "empty"])
def test_two_processes_evaluate_like_one(one_process, tmp_path, split):
    two = _run(tmp_path / "results.pt", split, 2)
    assert set(two) == {"clip", "albef", "meter_itm", "meter_vqa"}
    for name, want in one_process.items():
        got = two[name]
        assert got["scores"] == pytest.approx(want["scores"], abs=1e-4), name
        assert {k: v for k, v in got.items() if k != "scores"} == {k: v for k, v in want.items() if k != "scores"}
    assert one_process["albef"]["num_images"] == 12 and "itm_acc" in one_process["albef"]["scores"]
    assert set(one_process["meter_itm"]["scores"]) == {"itm_acc", "mlm_acc"}
    assert "acc" in one_process["meter_vqa"]["scores"] or "overall" in str(one_process["meter_vqa"]["scores"])
