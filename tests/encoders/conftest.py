"""Checks every tower adapter must pass: gradients reach every trainable parameter, and
``lock(k)`` leaves exactly the top ``k`` layer groups trainable (the rest frozen, in eval)."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch

from vlp.encoders import Encoder, EncoderOutput


def random_loss(out: EncoderOutput, *extra: torch.Tensor) -> torch.Tensor:
    """A loss that reaches every output element (a plain sum of a LayerNorm output would not)."""
    g = torch.Generator().manual_seed(0)
    return sum((t * torch.randn(t.shape, generator=g)).sum() for t in (out.tokens, out.pooled, *extra))


def check_grads(encoder: Encoder, loss: torch.Tensor, no_grad: tuple[str, ...] = ()) -> None:
    """Every trainable parameter gets a non-zero gradient, except names starting with ``no_grad``."""
    loss.backward()
    missing = [
        n
        for n, p in encoder.named_parameters()
        if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0) and not n.startswith(no_grad)
    ]
    assert not missing, missing
    if no_grad:  # the exemptions are real: those parameters exist and get nothing
        exempt = [p for n, p in encoder.named_parameters() if n.startswith(no_grad)]
        assert exempt and all(p.grad is None for p in exempt)


def check_lock(make: Callable[[], Encoder], n_groups: int) -> None:
    """lock(k) for every k: requires_grad and train/eval mode follow the layer groups."""
    for k in range(n_groups + 1):
        encoder = make()
        groups = encoder.layer_groups()
        assert len(groups) == n_groups
        covered = {id(p) for g in groups for p in g.parameters()}
        assert covered == {id(p) for p in encoder.parameters()}, "groups must cover every parameter"
        encoder.lock(unlocked_layers=k).train()
        top = {id(p) for g in groups[n_groups - k :] for p in g.parameters()}
        assert [n for n, p in encoder.named_parameters() if p.requires_grad != (id(p) in top)] == []
        for i, group in enumerate(groups):
            frozen = i < n_groups - k
            modes = {m.training for member in group.members for m in member.modules()}
            assert modes == {not frozen}, (k, i, modes)
        if k == 0:
            assert not any(m.training for m in encoder.modules())
    with pytest.raises(ValueError, match="unlocked_layers"):
        make().lock(unlocked_layers=n_groups + 1)


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 for the test: loading by local path must not need the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def checks() -> SimpleNamespace:
    return SimpleNamespace(loss=random_loss, grads=check_grads, lock=check_lock)
