"""Checks every block passes: all parameters learn, eval is deterministic, forward is pure."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from vlp.blocks import (
    Attention,
    CoAttentionFusion,
    FusionOutput,
    GatedCrossAttentionDense,
    MaskedCrossAttention,
    MergedAttentionFusion,
    Mlp,
    PerceiverResampler,
    Transformer,
    TransformerBlock,
)

B, L, S, D, H, DC = 2, 6, 5, 32, 4, 24


def pad(lengths: list[int], length: int) -> torch.Tensor:
    return torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]


def gated(drop: float) -> GatedCrossAttentionDense:
    block = GatedCrossAttentionDense(D, DC, num_heads=4, dim_head=8, ff_mult=2)
    with torch.no_grad():  # open the zero-init gates so that everything behind them learns
        block.attn_gate.fill_(0.5)
        block.ff_gate.fill_(0.5)
    return block


LOCATIONS = torch.tensor([[True] + [False] * (L - 1), [False, True, False, False, True, False]])


@dataclass
class Case:
    build: Callable[[float], nn.Module]  # dropout rate -> module
    inputs: Callable[[], tuple[tuple, dict]]  # -> (args, kwargs)
    has_dropout: bool = True


CASES = {
    "mlp": Case(lambda p: Mlp(D, drop=p), lambda: ((torch.randn(B, L, D),), {})),
    "self_attention": Case(
        lambda p: Attention(D, H, attn_drop=p, proj_drop=p),
        lambda: ((torch.randn(B, L, D),), {"key_padding_mask": pad([L, 3], L), "is_causal": True}),
    ),
    "cross_attention": Case(
        lambda p: Attention(D, H, context_dim=DC, attn_drop=p, proj_drop=p),
        lambda: (
            (torch.randn(B, L, D), torch.randn(B, S, DC)),
            {"key_padding_mask": pad([S, 2], S)},
        ),
    ),
    "block_pre_norm_cross": Case(
        lambda p: TransformerBlock(
            D,
            H,
            drop=p,
            attn_drop=p,
            drop_path=p,
            cross_attention=True,
            context_dim=DC,
            layer_scale_init=0.1,
        ),
        lambda: (
            (torch.randn(B, L, D),),
            {
                "mask": pad([L, 4], L),
                "context": torch.randn(B, S, DC),
                "context_mask": pad([S, 2], S),
            },
        ),
    ),
    "block_post_norm": Case(
        lambda p: TransformerBlock(D, H, drop=p, attn_drop=p, drop_path=p, pre_norm=False),
        lambda: ((torch.randn(B, L, D),), {"mask": pad([L, 4], L)}),
    ),
    "transformer": Case(
        lambda p: Transformer(D, 2, H, drop=p, attn_drop=p, drop_path_rate=p),
        lambda: ((torch.randn(B, L, D),), {"mask": pad([L, 4], L)}),
    ),
    "merged_fusion": Case(
        lambda p: MergedAttentionFusion(D, 2, H, drop=p, attn_drop=p, drop_path_rate=p),
        lambda: (
            (torch.randn(B, L, D), torch.randn(B, S, D)),
            {"text_mask": pad([L, 4], L), "image_mask": pad([3, S], S)},
        ),
    ),
    "co_fusion": Case(
        lambda p: CoAttentionFusion(D, 2, H, drop=p, attn_drop=p, drop_path_rate=p),
        lambda: (
            (torch.randn(B, L, D), torch.randn(B, S, D)),
            {"text_mask": pad([L, 4], L), "image_mask": pad([3, S], S)},
        ),
    ),
    "co_fusion_pre_norm": Case(
        lambda p: CoAttentionFusion(D, 2, H, pre_norm=True, drop=p, drop_path_rate=p),
        lambda: ((torch.randn(B, L, D), torch.randn(B, S, D)), {}),
    ),
    "perceiver": Case(
        lambda p: PerceiverResampler(
            D, depth=2, num_latents=3, num_heads=4, dim_head=8, max_num_media=2, max_num_frames=2
        ),
        lambda: ((torch.randn(B, 2, 2, S, D),), {}),
        has_dropout=False,
    ),
    "masked_cross_attention": Case(
        lambda p: MaskedCrossAttention(D, DC, num_heads=4, dim_head=8),
        lambda: ((torch.randn(B, L, D), torch.randn(B, 2, 3, DC)), {"media_locations": LOCATIONS}),
        has_dropout=False,
    ),
    "gated_xattn_dense": Case(
        gated,
        lambda: ((torch.randn(B, L, D), torch.randn(B, 2, 3, DC)), {"media_locations": LOCATIONS}),
        has_dropout=False,
    ),
}


def flat(out) -> torch.Tensor:
    if isinstance(out, FusionOutput):
        return torch.cat([out.text_tokens, out.image_tokens], dim=1)
    return out


def snapshot(module: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in module.state_dict().items()},
        "modes": [m.training for m in module.modules()],
        "requires_grad": [p.requires_grad for p in module.parameters()],
    }


def assert_same_snapshot(a: dict, b: dict) -> None:
    assert a["modes"] == b["modes"] and a["requires_grad"] == b["requires_grad"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k


@pytest.mark.parametrize("name", CASES)
def test_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    case = CASES[name]
    module = case.build(0.0).train()
    args, kwargs = case.inputs()
    out = flat(module(*args, **kwargs))
    assert torch.isfinite(out).all()
    # a random weighting: a plain sum has zero gradient through a final LayerNorm
    (out * torch.randn_like(out)).sum().backward()
    dead = [n for n, p in module.named_parameters() if p.grad is None or not p.grad.any()]
    assert not dead, f"{name}: parameters without gradient: {dead}"


@pytest.mark.parametrize("name", CASES)
def test_eval_is_deterministic_and_forward_is_pure(name):
    torch.manual_seed(0)
    case = CASES[name]
    module = case.build(0.2)
    args, kwargs = case.inputs()
    before = snapshot(module)

    module.train()
    train_outs = [flat(module(*args, **kwargs)) for _ in range(2)]
    if case.has_dropout:
        assert not torch.equal(*train_outs), "dropout should be active in training"
    module.eval()
    with torch.no_grad():
        eval_outs = [flat(module(*args, **kwargs)) for _ in range(2)]
    assert torch.equal(*eval_outs)

    module.train()
    after = snapshot(module)
    assert_same_snapshot(before, after)
