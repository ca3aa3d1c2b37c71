"""BertFusion's cached pair scoring equals its plain forward (ITM re-ranking relies on it)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from vlp.encoders import BertFusion
from vlp.encoders.bert import ContextCache

D, H, DC, LT, S = 32, 4, 24, 6, 5


def fusion(depth: int, **kwargs) -> BertFusion:
    torch.manual_seed(depth)
    f = BertFusion(D, depth, H, context_dim=DC, mlp_ratio=2.0, drop=0.0, attn_drop=0.0, **kwargs)
    with torch.no_grad():  # non-trivial norms and biases, so that their layout is covered too
        for p in f.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return f.eval()


def inputs(n_txt: int = 4, n_img: int = 3):
    g = torch.Generator().manual_seed(7)
    text = torch.randn(n_txt, LT, D, generator=g)
    lengths = torch.tensor([LT, 3, 1, 4])[:n_txt]
    mask = torch.arange(LT)[None, :] < lengths[:, None]  # (T, LT) padded captions
    images = torch.randn(n_img, S, DC, generator=g)
    return text, mask, images


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_cached_pairs_equal_plain_forward(depth):
    f = fusion(depth)
    text, mask, images = inputs()
    # every (text, image) pair, texts and images repeated as a re-ranker sees them
    t = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 3])
    i = torch.tensor([0, 0, 1, 2, 2, 1, 0, 1, 2])
    with torch.no_grad():
        plain = f(text[t], mask=mask[t], context=images[i])  # (n, LT, D)
        tc, cc = f.text_cache(text, mask), f.context_cache(images)
        full = f.forward_cached(tc.index(t), cc.index(i))
        cls = f.forward_cached(tc.index(t), cc.index(i), cls_only=True)
    assert cc.keys.shape == (depth, 3, H, S, D // H) and tc.tokens.shape == (4, LT, D)
    assert len(cc.index(i)) == len(t) and len(cc.index(i).index(torch.tensor([0, 8]))) == 2
    assert_close(full, plain, rtol=1e-5, atol=1e-5)
    assert cls.shape == (len(t), D)
    assert_close(cls, plain[:, 0], rtol=1e-5, atol=1e-5)


def test_cached_pairs_with_image_padding_mask():
    f = fusion(2)
    text, mask, images = inputs()
    image_mask = torch.ones(3, S, dtype=torch.bool)
    image_mask[1, 2:] = False  # image 1 has 2 real tokens
    t, i = torch.tensor([0, 1, 2, 3]), torch.tensor([1, 1, 0, 2])
    with torch.no_grad():
        plain = f(text[t], mask=mask[t], context=images[i], context_mask=image_mask[i])[:, 0]
        cached = f.forward_cached(
            f.text_cache(text, mask).index(t), f.context_cache(images, image_mask).index(i), cls_only=True
        )
        unmasked = f.forward_cached(f.text_cache(text, mask).index(t), f.context_cache(images).index(i), cls_only=True)
    assert_close(cached, plain, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unmasked[:2], plain[:2], atol=1e-4)  # the mask matters for image 1


def test_forward_cached_rejects_misaligned_caches():
    f = fusion(2)
    text, mask, images = inputs()
    tc, cc = f.text_cache(text, mask), f.context_cache(images)
    with pytest.raises(ValueError, match="4 texts but 3 contexts"):
        f.forward_cached(tc, cc)
    other = ContextCache(cc.keys[:1], cc.values[:1])
    with pytest.raises(ValueError, match="1 layers, the fusion 2"):
        f.forward_cached(tc.index(torch.arange(3)), other)


def test_context_cache_index_composes():
    f = fusion(2)
    _, _, images = inputs()
    cc = f.context_cache(images)
    once = cc.index(torch.tensor([2, 0, 1, 2])).index(torch.tensor([3, 1]))  # images 2, 0
    k, v, _ = once.layer(1)
    assert_close(k, cc.keys[1, [2, 0]])
    assert_close(v, cc.values[1, [2, 0]])


def test_trimmed_text_cache_gives_the_same_cls():
    f = fusion(2)
    text, mask, images = inputs()  # caption lengths 6, 3, 1, 4
    tc, cc = f.text_cache(text, mask), f.context_cache(images)
    assert tc.extent().tolist() == [6, 3, 1, 4]
    t, i = torch.tensor([1, 3, 2]), torch.tensor([0, 2, 1])
    trimmed = tc.index(t, trim=True, multiple=1)
    assert trimmed.tokens.shape == (3, 4, D) and trimmed.mask.shape == (3, 4)  # widest selected: 4
    assert tc.index(t, trim=True, multiple=3).tokens.shape[1] == 6  # rounded up to a multiple of 3
    assert tc.index(t, trim=True).tokens.shape[1] == LT  # rounded up to 8, capped at LT
    assert tc.index(torch.tensor([0, 1]), trim=True, multiple=1).tokens.shape[1] == LT  # nothing to trim
    with torch.no_grad():
        plain = f(text[t], mask=mask[t], context=images[i])[:, 0]
        got = f.forward_cached(trimmed, cc.index(i), cls_only=True)
    assert_close(got, plain, rtol=1e-5, atol=1e-5)
