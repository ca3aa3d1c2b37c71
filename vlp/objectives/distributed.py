"""Collectives for losses that must give the same numbers at any world size.

The rank and world size are read at call time (never stored in a loss), so the same
loss object works in a 1-process test and under DDP.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_info() -> tuple[int, int]:
    """(rank, world_size) of the default process group, (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_objects(value) -> list:
    """``value`` (any picklable object) of every rank, in rank order; ``[value]`` when not
    distributed."""
    rank, world = world_info()
    if world == 1:
        return [value]
    values: list = [None] * world
    dist.all_gather_object(values, value)
    return values


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends every rank's gradient slice back to its owner.

    Backward all-reduces (sums) the gradient of the gathered tensor and returns this
    rank's slice: ``d(sum of all ranks' losses) / d(local input)``. all_reduce rather
    than reduce_scatter so that gloo (CPU) works too.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, world = world_info()
        ctx.rank, ctx.n = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)  # (world * B, ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B, ...) from all ranks in rank order, keeping gradients.

    Every rank must pass the same batch size (pad otherwise). Identity when not distributed.
    """
    _, world = world_info()
    if world == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks without gradient (ids, momentum features)."""
    _, world = world_info()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)
