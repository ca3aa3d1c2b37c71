"""Run by test_distributed.py in each of 2 processes (gloo): ITC on this rank's half."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vlp.models.outputs import DualEncoderOutput
from vlp.objectives import ITC


def main(workdir: str, positives: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = torch.load(os.path.join(workdir, "inputs.pt"))
    img_net, txt_net, itc = torch.nn.Linear(6, 4), torch.nn.Linear(5, 4), ITC(positives=positives)
    img_net.load_state_dict(data["img_net"])
    txt_net.load_state_dict(data["txt_net"])
    n = data["images"].shape[0] // world
    part = slice(rank * n, (rank + 1) * n)
    out = DualEncoderOutput(
        image_embeds=F.normalize(img_net(data["images"][part]), dim=-1),
        text_embeds=F.normalize(txt_net(data["texts"][part]), dim=-1),
    )
    loss = itc(out, {"image_id": data["ids"][part]})["itc_loss"]
    loss.backward()
    params = [*img_net.parameters(), *txt_net.parameters(), *itc.parameters()]
    for p in params:  # what DDP does: average gradients over ranks
        dist.all_reduce(p.grad)
        p.grad /= world
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    if rank == 0:
        torch.save({"loss": mean_loss / world, "grads": [p.grad for p in params]}, os.path.join(workdir, "dist.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
