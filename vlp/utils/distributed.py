"""Collectives for losses and evaluation that must give the same numbers at any world size.

The rank and world size are read at call time (never stored in a loss), so the same
loss object works in a 1-process test and under DDP. Training gathers (``gather_with_grad``,
``gather_no_grad``) need equal batch sizes on every rank; evaluation gathers
(:func:`gather_cat`, :func:`all_reduce_sum`) take any size, a rank with nothing included.
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


@torch.no_grad()
def gather_cat(x: torch.Tensor | None) -> torch.Tensor | None:
    """Concatenate ``x`` (N_r, ...) of every rank in rank order along dim 0, whatever each
    rank's N_r (evaluation: a rank may hold fewer samples, or none: pass None). Trailing
    dimensions may differ in dim 1 only (padded text lengths): rows are zero-padded to the
    longest. Returns None when every rank passed None; identity when not distributed."""
    _, world = world_info()
    if world == 1:
        return x
    meta = gather_objects(None if x is None else (tuple(x.shape), x.dtype))
    shapes = [m[0] for m in meta if m is not None]
    if not shapes:
        return None
    dtype = next(m[1] for m in meta if m is not None)
    rows = max(s[0] for s in shapes)
    tail = list(shapes[0][1:])
    if len(tail) >= 1:
        tail[0] = max(s[1] for s in shapes)
    device = x.device if x is not None else _collective_device()
    local = torch.zeros((rows, *tail), dtype=dtype, device=device)
    if x is not None and x.numel():
        local[tuple(slice(0, n) for n in x.shape)] = x
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local)
    return torch.cat([p[: m[0][0]] for p, m in zip(parts, meta, strict=True) if m is not None])


@torch.no_grad()
def all_reduce_sum(values: dict[str, float]) -> dict[str, float]:
    """Sum a dict of counters over ranks (every rank must pass the same keys)."""
    _, world = world_info()
    if world == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist(), strict=True))


def _collective_device() -> torch.device:
    """The device collectives of the default group run on (NCCL: the current GPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
