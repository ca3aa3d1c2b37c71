"""CoAttentionFusion's cached pair scoring equals its plain forward."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from vlp.blocks.fusion import CoAttentionFusion

D, H, LT, LI = 32, 4, 6, 5


def fusion(depth: int, pre_norm: bool) -> CoAttentionFusion:
    torch.manual_seed(depth)
    f = CoAttentionFusion(D, depth, H, mlp_ratio=2.0, pre_norm=pre_norm)
    with torch.no_grad():  # non-trivial norms and biases
        for p in f.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return f.eval()


def inputs():
    g = torch.Generator().manual_seed(3)
    text, images = torch.randn(4, LT, D, generator=g), torch.randn(3, LI, D, generator=g)
    text_mask = torch.arange(LT)[None, :] < torch.tensor([LT, 3, 1, 4])[:, None]  # (4, LT)
    image_mask = torch.arange(LI)[None, :] < torch.tensor([LI, 2, 4])[:, None]  # (3, LI)
    return text, text_mask, images, image_mask


@pytest.mark.parametrize("pre_norm", [False, True])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_cached_pairs_equal_plain_forward(depth, pre_norm):
    f = fusion(depth, pre_norm)
    text, text_mask, images, image_mask = inputs()
    t, i = torch.tensor([0, 1, 2, 3, 0, 3, 1]), torch.tensor([0, 0, 1, 2, 2, 1, 2])
    with torch.no_grad():
        plain = f(text[t], images[i], text_mask=text_mask[t], image_mask=image_mask[i])
        tc = f.stream_cache(text, text_mask, stream="text")
        ic = f.stream_cache(images, image_mask, stream="image")
        full = f.forward_cached(tc.index(t), ic.index(i))
        cls = f.forward_cached(tc.index(t), ic.index(i), cls_only=True)
    assert_close(full.text_tokens, plain.text_tokens, rtol=1e-5, atol=1e-5)
    assert_close(full.image_tokens, plain.image_tokens, rtol=1e-5, atol=1e-5)
    assert cls.text_tokens.shape == (7, 1, D) and cls.image_tokens.shape == (7, 1, D)
    assert_close(cls.text_tokens, plain.text_tokens[:, :1], rtol=1e-5, atol=1e-5)
    assert_close(cls.image_tokens, plain.image_tokens[:, :1], rtol=1e-5, atol=1e-5)


def test_stream_cache_bad_input():
    f = fusion(2, False)
    text, text_mask, images, image_mask = inputs()
    with pytest.raises(ValueError, match="stream must be 'text' or 'image'"):
        f.stream_cache(text, text_mask, stream="audio")
    tc, ic = f.stream_cache(text, text_mask, stream="text"), f.stream_cache(images, image_mask, stream="image")
    with pytest.raises(ValueError, match="4 texts but 3 images"):
        f.forward_cached(tc, ic)
