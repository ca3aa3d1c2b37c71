"""Attention: shapes, parity with nn.MultiheadAttention, and the mask conventions."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from vlp.blocks import Attention

B, L, S, D, H, DC = 2, 5, 7, 32, 4, 24


def randomize_(module: nn.Module) -> nn.Module:
    """Non-trivial biases and norms, so that parity tests cover their layout too."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module


def to_mha(attn: Attention) -> nn.MultiheadAttention:
    """An nn.MultiheadAttention holding ``attn``'s weights."""
    kdim = attn.kv.in_features if attn.is_cross else None
    mha = nn.MultiheadAttention(D, H, batch_first=True, kdim=kdim, vdim=kdim)
    with torch.no_grad():
        if attn.is_cross:
            mha.q_proj_weight.copy_(attn.q.weight)
            mha.k_proj_weight.copy_(attn.kv.weight[:D])
            mha.v_proj_weight.copy_(attn.kv.weight[D:])
            mha.in_proj_bias.copy_(torch.cat([attn.q.bias, attn.kv.bias]))
        else:
            mha.in_proj_weight.copy_(attn.qkv.weight)
            mha.in_proj_bias.copy_(attn.qkv.bias)
        mha.out_proj.weight.copy_(attn.proj.weight)
        mha.out_proj.bias.copy_(attn.proj.bias)
    return mha.eval()


def padding_mask(lengths: list[int], length: int) -> torch.Tensor:
    """(B, length) bool, True at the first ``lengths[b]`` positions (real tokens)."""
    return torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]


def causal(length: int) -> torch.Tensor:
    return torch.ones(length, length, dtype=torch.bool).tril()


def test_shapes_and_submodules():
    torch.manual_seed(0)
    x, ctx = torch.randn(B, L, D), torch.randn(B, S, DC)
    self_attn, cross_attn = Attention(D, H), Attention(D, H, context_dim=DC)
    assert self_attn(x).shape == (B, L, D)
    assert cross_attn(x, ctx).shape == (B, L, D)
    assert self_attn.qkv.weight.shape == (3 * D, D) and not hasattr(self_attn, "kv")
    assert cross_attn.q.weight.shape == (D, D) and cross_attn.kv.weight.shape == (2 * D, DC)
    assert Attention(D, H, qkv_bias=False).qkv.bias is None


@pytest.mark.parametrize("masking", ["none", "padding", "causal", "padding+causal"])
def test_self_attention_matches_multihead_attention(masking):
    torch.manual_seed(0)
    attn = randomize_(Attention(D, H)).eval()
    mha = to_mha(attn)
    x = torch.randn(B, L, D)
    kpm = padding_mask([L, 3], L) if "padding" in masking else None
    is_causal = "causal" in masking
    out = attn(x, key_padding_mask=kpm, is_causal=is_causal)
    ref, _ = mha(
        x,
        x,
        x,
        key_padding_mask=None if kpm is None else ~kpm,  # MHA: True = ignore
        attn_mask=~causal(L) if is_causal else None,
        need_weights=False,
    )
    assert_close(out, ref)


def test_cross_attention_matches_multihead_attention():
    torch.manual_seed(0)
    attn = randomize_(Attention(D, H, context_dim=DC)).eval()
    mha = to_mha(attn)
    x, ctx = torch.randn(B, L, D), torch.randn(B, S, DC)
    kpm = padding_mask([S, 4], S)
    ref, _ = mha(x, ctx, ctx, key_padding_mask=~kpm, need_weights=False)
    assert_close(attn(x, ctx, key_padding_mask=kpm), ref)


def test_bool_and_float_masks_agree_and_broadcast():
    torch.manual_seed(0)
    attn = Attention(D, H).eval()
    x = torch.randn(B, L, D)
    allowed = torch.rand(B, H, L, L) > 0.3
    allowed |= torch.eye(L, dtype=torch.bool)  # every row keeps a key
    additive = torch.zeros(B, H, L, L).masked_fill(~allowed, float("-inf"))
    assert_close(attn(x, attn_mask=allowed), attn(x, attn_mask=additive))
    # is_causal together with an explicit mask equals the causal mask folded in by hand
    kpm = padding_mask([L, 4], L)
    assert_close(
        attn(x, key_padding_mask=kpm, is_causal=True),
        attn(x, attn_mask=causal(L) & kpm[:, None, None, :]),
    )


@pytest.mark.parametrize("cross", [False, True])
def test_padded_keys_do_not_change_real_outputs(cross):
    torch.manual_seed(0)
    attn = Attention(D, H, context_dim=DC if cross else None).eval()
    n = S if cross else L
    kpm = padding_mask([n, n - 2], n)
    x = torch.randn(B, L, D)
    ctx = torch.randn(B, S, DC) if cross else None
    out = attn(x, ctx, key_padding_mask=kpm)
    if cross:
        ctx2 = torch.where(kpm[..., None], ctx, torch.randn_like(ctx))
        out2 = attn(x, ctx2, key_padding_mask=kpm)
        assert_close(out, out2)
    else:
        x2 = torch.where(kpm[..., None], x, 100 * torch.randn_like(x))
        out2 = attn(x2, key_padding_mask=kpm)
        assert_close(out[kpm], out2[kpm])  # real query rows only


def test_fully_masked_rows_are_finite_zero_attention():
    torch.manual_seed(0)
    attn = Attention(D, H, context_dim=DC)
    with torch.no_grad():
        attn.proj.bias.normal_()
    x, ctx = torch.randn(B, L, D, requires_grad=True), torch.randn(B, S, DC)
    kpm = padding_mask([S, 0], S)  # sample 1 has no real key at all
    row_mask = torch.ones(L, S, dtype=torch.bool)
    row_mask[2] = False  # query 2 may attend to nothing
    float_mask = torch.zeros(L, S).masked_fill(~row_mask, float("-inf"))
    for kwargs in (
        {"key_padding_mask": kpm},
        {"attn_mask": row_mask},
        {"attn_mask": float_mask},
        {"attn_mask": float_mask, "key_padding_mask": kpm},
    ):
        out = attn(x, ctx, **kwargs)
        assert torch.isfinite(out).all()
        out.sum().backward()
        assert torch.isfinite(x.grad).all()
        x.grad = None
    # an empty row's attention output is zero, so the block outputs the projection bias
    bias = attn.proj.bias.expand(L, D)
    assert_close(attn(x, ctx, key_padding_mask=kpm)[1], bias)
    assert_close(attn(x, ctx, attn_mask=float_mask)[:, 2], bias[:B])


def test_qk_norm_gets_gradients():
    torch.manual_seed(0)
    attn = Attention(D, H, qk_norm=True)
    assert attn.q_norm.weight.shape == (D // H,)
    out = attn(torch.randn(B, L, D))
    (out * torch.randn_like(out)).sum().backward()
    for name, p in attn.named_parameters():
        if name == "k_norm.bias":
            # softmax is shift-invariant along keys: a bias shared by all keys has no effect
            assert_close(p.grad, torch.zeros_like(p), atol=1e-6, rtol=0)
        else:
            assert p.grad is not None and p.grad.abs().max() > 0, name


def test_context_errors():
    x = torch.randn(B, L, D)
    with pytest.raises(ValueError, match="context"):
        Attention(D, H)(x, torch.randn(B, S, D))
    with pytest.raises(ValueError, match="context"):
        Attention(D, H, context_dim=DC)(x)
    with pytest.raises(ValueError, match="divisible"):
        Attention(30, H)
