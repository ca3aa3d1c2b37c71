"""Mlp, TransformerBlock (pre/post-norm formulas) and the Transformer stack."""

from __future__ import annotations

import pytest
import torch
from timm.layers import DropPath
from torch import nn
from torch.testing import assert_close

import vlp.blocks.transformer as transformer_module
from vlp.blocks import Mlp, Transformer, TransformerBlock

B, L, S, D, H, DC = 2, 6, 4, 32, 4, 24


def test_mlp_shapes_and_widths():
    torch.manual_seed(0)
    mlp = Mlp(D)
    assert (mlp.fc1.out_features, mlp.fc2.out_features) == (4 * D, D)
    assert Mlp(D, 48, 8)(torch.randn(B, L, D)).shape == (B, L, 8)
    assert Mlp(D, bias=False).fc1.bias is None
    assert isinstance(Mlp(D, act_layer=nn.ReLU).act, nn.ReLU)


def test_pre_norm_block_computes_its_formula():
    torch.manual_seed(0)
    block = TransformerBlock(D, H, cross_attention=True, context_dim=DC, layer_scale_init=0.5)
    block.eval()
    x, ctx = torch.randn(B, L, D), torch.randn(B, S, DC)
    mask, ctx_mask = torch.rand(B, L) > 0.2, torch.rand(B, S) > 0.2
    mask[:, 0] = ctx_mask[:, 0] = True
    h = x + 0.5 * block.attn(block.norm1(x), key_padding_mask=mask)
    h = h + 0.5 * block.cross_attn(block.norm_cross(h), ctx, key_padding_mask=ctx_mask)
    ref = h + 0.5 * block.mlp(block.norm2(h))
    assert_close(block(x, mask=mask, context=ctx, context_mask=ctx_mask), ref)


def test_post_norm_block_computes_its_formula():
    torch.manual_seed(0)
    block = TransformerBlock(D, H, pre_norm=False, cross_attention=True, norm_eps=1e-12).eval()
    assert block.norm1.eps == 1e-12
    x, ctx = torch.randn(B, L, D), torch.randn(B, S, D)
    ctx_mask = torch.tensor([[True] * S, [True, True, False, False]])
    h = block.norm1(x + block.attn(x, is_causal=True))
    h = block.norm_cross(h + block.cross_attn(h, ctx, key_padding_mask=ctx_mask))
    ref = block.norm2(h + block.mlp(h))
    out = block(x, context=ctx, context_mask=ctx_mask, is_causal=True)
    assert_close(out, ref)
    # post-norm ends in a norm; pre-norm does not
    pre = TransformerBlock(D, H, cross_attention=True).eval()
    pre.load_state_dict(block.state_dict())
    assert not torch.allclose(pre(x, context=ctx), block(x, context=ctx))


def test_block_layer_types_and_context_errors():
    block = TransformerBlock(D, H, mlp_ratio=2.0, act_layer=nn.ReLU, mlp_layer=Mlp)
    assert block.mlp.fc1.out_features == 2 * D and isinstance(block.mlp.act, nn.ReLU)
    assert block.cross_attn is None and block.norm_cross is None
    x = torch.randn(B, L, D)
    with pytest.raises(ValueError, match="cross_attention=True"):
        block(x, context=torch.randn(B, S, D))
    with pytest.raises(ValueError, match="needs a `context`"):
        TransformerBlock(D, H, cross_attention=True)(x)
    with pytest.raises(ValueError, match="cross_attention=False"):
        TransformerBlock(D, H, context_dim=DC)


def test_causal_stack_ignores_future_tokens():
    torch.manual_seed(0)
    model = Transformer(D, 2, H).eval()
    x = torch.randn(B, L, D)
    x2 = x.clone()
    x2[:, 3:] = torch.randn(B, L - 3, D)
    assert_close(model(x, is_causal=True)[:, :3], model(x2, is_causal=True)[:, :3])


def test_final_norm_follows_pre_norm():
    assert isinstance(Transformer(D, 1, H).norm, nn.LayerNorm)
    assert isinstance(Transformer(D, 1, H, pre_norm=False).norm, nn.Identity)
    assert isinstance(Transformer(D, 1, H, pre_norm=False, final_norm=True).norm, nn.LayerNorm)
    assert Transformer(D, 1, H, norm_eps=1e-5).norm.eps == 1e-5


def test_drop_path_rate_is_spread_linearly_over_depth():
    model = Transformer(D, 4, H, drop_path_rate=0.3)
    assert isinstance(model.blocks[0].drop_path, nn.Identity)  # rate 0
    rates = [b.drop_path.drop_prob for b in model.blocks[1:]]
    assert all(isinstance(b.drop_path, DropPath) for b in model.blocks[1:])
    assert_close(torch.tensor(rates), torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="drop_path_rate"):
        Transformer(D, 2, H, drop_path=0.1)


def test_grad_checkpointing_matches_plain_forward_and_backward(monkeypatch):
    torch.manual_seed(0)
    model = Transformer(D, 3, H, cross_attention=True, drop_path_rate=0.2, drop=0.1).train()
    x, ctx = torch.randn(B, L, D), torch.randn(B, S, D)
    mask = torch.tensor([[True] * L, [True] * 4 + [False] * 2])
    weights = torch.randn(B, L, D)

    def run():
        model.zero_grad()
        torch.manual_seed(1)  # same dropout / drop-path draws in both runs
        out = model(x, mask=mask, context=ctx)
        (out * weights).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    out, grads = run()
    calls = []
    real_checkpoint = transformer_module.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(kwargs["use_reentrant"])
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(transformer_module, "checkpoint", counting_checkpoint)
    model.set_grad_checkpointing()
    out_ckpt, grads_ckpt = run()
    assert calls == [False] * 3
    assert_close(out_ckpt, out)
    for name in grads:
        assert_close(grads_ckpt[name], grads[name], msg=name)
    # no checkpointing in eval mode
    model.eval()
    model(x, mask=mask, context=ctx)
    assert len(calls) == 3
