"""METER fusion: merged attention (one stream) and co-attention (two streams)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from vlp.blocks import CoAttentionFusion, FusionOutput, MergedAttentionFusion

B, LT, LI, D, H = 2, 5, 7, 32, 4


def inputs():
    torch.manual_seed(1)
    text, image = torch.randn(B, LT, D), torch.randn(B, LI, D)
    text_mask = torch.tensor([[True] * LT, [True] * 3 + [False] * 2])
    image_mask = torch.tensor([[True] * 5 + [False] * 2, [True] * LI])
    return text, image, text_mask, image_mask


def perturb_padding(x, mask):
    return torch.where(mask[..., None], x, 10 * torch.randn_like(x))


def assert_real_tokens_unchanged(a: FusionOutput, b: FusionOutput, text_mask, image_mask):
    assert_close(a.text_tokens[text_mask], b.text_tokens[text_mask])
    assert_close(a.image_tokens[image_mask], b.image_tokens[image_mask])


def test_merged_splits_a_single_stream():
    torch.manual_seed(0)
    fusion = MergedAttentionFusion(D, 2, H).eval()
    text, image, text_mask, image_mask = inputs()
    out = fusion(text, image, text_mask=text_mask, image_mask=image_mask)
    assert isinstance(out, FusionOutput)
    assert out.text_tokens.shape == (B, LT, D) and out.image_tokens.shape == (B, LI, D)
    whole = fusion.transformer(torch.cat([text, image], 1), mask=torch.cat([text_mask, image_mask], 1))
    assert_close(torch.cat([out.text_tokens, out.image_tokens], 1), whole)
    # post-norm (BERT layout) by default: no extra final norm
    assert not fusion.transformer.blocks[0].pre_norm
    assert isinstance(fusion.transformer.norm, nn.Identity)


@pytest.mark.parametrize("fusion_cls", [MergedAttentionFusion, CoAttentionFusion])
def test_padding_is_respected_on_both_streams(fusion_cls):
    torch.manual_seed(0)
    fusion = fusion_cls(D, 2, H).eval()
    text, image, text_mask, image_mask = inputs()
    out = fusion(text, image, text_mask=text_mask, image_mask=image_mask)
    text2, image2 = perturb_padding(text, text_mask), perturb_padding(image, image_mask)
    for t, v in ((text2, image), (text, image2), (text2, image2)):
        out2 = fusion(t, v, text_mask=text_mask, image_mask=image_mask)
        assert_real_tokens_unchanged(out, out2, text_mask, image_mask)
    # only the image mask given: the text is taken as all real
    out = fusion(text, image, image_mask=image_mask)
    out2 = fusion(text, image2, image_mask=image_mask)
    assert_real_tokens_unchanged(out, out2, torch.ones(B, LT, dtype=torch.bool), image_mask)


@pytest.mark.parametrize("pre_norm", [False, True])
def test_co_attention_uses_previous_layer_of_both_streams(pre_norm):
    torch.manual_seed(0)
    fusion = CoAttentionFusion(D, 3, H, pre_norm=pre_norm).eval()
    text, image, text_mask, image_mask = inputs()
    out = fusion(text, image, text_mask=text_mask, image_mask=image_mask)
    assert out.text_tokens.shape == (B, LT, D) and out.image_tokens.shape == (B, LI, D)

    t, v = text, image
    for i in range(3):
        t_new = fusion.text_layers[i](t, mask=text_mask, context=v, context_mask=image_mask)
        v_new = fusion.image_layers[i](v, mask=image_mask, context=t, context_mask=text_mask)
        t, v = t_new, v_new
    if pre_norm:
        t, v = fusion.text_norm(t), fusion.image_norm(v)
    else:
        assert isinstance(fusion.text_norm, nn.Identity)
    assert_close(out.text_tokens, t)
    assert_close(out.image_tokens, v)

    # the sequential update (image reads the *new* text) is a different function
    t, v = text, image
    for i in range(3):
        t = fusion.text_layers[i](t, mask=text_mask, context=v, context_mask=image_mask)
        v = fusion.image_layers[i](v, mask=image_mask, context=t, context_mask=text_mask)
    assert not torch.allclose(out.image_tokens, fusion.image_norm(v))


def test_co_attention_layers_are_cross_attention_blocks():
    fusion = CoAttentionFusion(D, 2, H, drop_path_rate=0.1, norm_eps=1e-12)
    for layers in (fusion.text_layers, fusion.image_layers):
        assert len(layers) == 2
        assert all(layer.cross_attn is not None and not layer.pre_norm for layer in layers)
        assert layers[1].drop_path.drop_prob == pytest.approx(0.1)
        assert layers[0].norm1.eps == 1e-12


@pytest.mark.parametrize("fusion_cls", [MergedAttentionFusion, CoAttentionFusion])
def test_grad_checkpointing_matches(fusion_cls):
    torch.manual_seed(0)
    fusion = fusion_cls(D, 2, H).train()
    text, image, text_mask, image_mask = inputs()
    text.requires_grad_(True)

    def run():
        text.grad = None
        out = fusion(text, image, text_mask=text_mask, image_mask=image_mask)
        loss = out.text_tokens.square().mean() + out.image_tokens.pow(3).mean()
        loss.backward()
        return out, text.grad.clone()

    out, grad = run()
    fusion.set_grad_checkpointing()
    out_ckpt, grad_ckpt = run()
    assert_close(out_ckpt.text_tokens, out.text_tokens)
    assert_close(out_ckpt.image_tokens, out.image_tokens)
    assert_close(grad_ckpt, grad)
