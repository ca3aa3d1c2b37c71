"""1 process vs 2 processes (gloo, CPU): the gathered ITC loss and its gradients agree."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import free_port

from vlp.models.outputs import DualEncoderOutput
from vlp.objectives import ITC

WORKER = Path(__file__).with_name("dist_worker.py")


@pytest.mark.parametrize("positives", ["diagonal", "same_id"])
def test_two_processes_match_one(tmp_path, positives):
    torch.manual_seed(0)
    img_net, txt_net = torch.nn.Linear(6, 4), torch.nn.Linear(5, 4)
    data = {
        "images": torch.randn(8, 6),
        "texts": torch.randn(8, 5),
        "ids": torch.tensor([0, 1, 2, 2, 3, 4, 0, 5]),  # same-id pairs across the two ranks
        "img_net": img_net.state_dict(),
        "txt_net": txt_net.state_dict(),
    }
    torch.save(data, tmp_path / "inputs.pt")

    itc = ITC(positives=positives)
    out = DualEncoderOutput(
        image_embeds=F.normalize(img_net(data["images"]), dim=-1),
        text_embeds=F.normalize(txt_net(data["texts"]), dim=-1),
    )
    loss = itc(out, {"image_id": data["ids"]})["itc_loss"]
    loss.backward()
    params = [*img_net.parameters(), *txt_net.parameters(), *itc.parameters()]

    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(tmp_path), positives],
            env={**env, "RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    for p in procs:
        output, _ = p.communicate(timeout=120)
        assert p.returncode == 0, output.decode()
    dist = torch.load(tmp_path / "dist.pt")
    # equal halves: the mean of the per-rank losses is the global loss
    torch.testing.assert_close(dist["loss"], loss.detach())
    for got, p in zip(dist["grads"], params):
        torch.testing.assert_close(got, p.grad, rtol=1e-5, atol=1e-6)
