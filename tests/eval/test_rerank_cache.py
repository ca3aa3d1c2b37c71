"""Re-ranking with a separate k per direction, and the cached fusion path, against slow references."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from vlp.blocks.fusion import CoAttentionFusion
from vlp.encoders import BertFusion
from vlp.eval import rerank_topk, rerank_with_cache
from vlp.eval.retrieval import score_all_pairs, score_all_pairs_with_cache


def brute_force(sims: torch.Tensor, k_i2t: int, k_t2i: int, fn, add_itc: bool = False):
    """Python loops: each query's top-k candidates by ITC, each scored on its own."""
    n_img, n_txt = sims.shape
    i2t = torch.full((n_img, n_txt), float("-inf"))
    t2i = torch.full((n_txt, n_img), float("-inf"))

    def score(i: int, t: int) -> float:
        s = float(fn(torch.tensor([i]), torch.tensor([t]))[0])
        return s + float(sims[i, t]) if add_itc else s

    for i in range(n_img):
        for t in sorted(range(n_txt), key=lambda t: -float(sims[i, t]))[:k_i2t]:
            i2t[i, t] = score(i, t)
    for t in range(n_txt):
        for i in sorted(range(n_img), key=lambda i: -float(sims[i, t]))[:k_t2i]:
            t2i[t, i] = score(i, t)
    return i2t, t2i


@pytest.mark.parametrize(
    ("k_i2t", "k_t2i", "batch_size", "add_itc"),
    [(3, 3, 4, False), (1, 5, 7, False), (6, 2, 1, True), (0, 4, 3, False), (20, 0, 64, True)],
)
def test_rerank_topk_equals_brute_force(k_i2t, k_t2i, batch_size, add_itc):
    g = torch.Generator().manual_seed(k_i2t * 10 + k_t2i)
    n_img, n_txt = 7, 13
    sims = torch.randn(n_img, n_txt, generator=g)
    table = torch.randn(n_img, n_txt, generator=g)  # an arbitrary pair scorer
    fn = lambda i, t: table[i, t]  # noqa: E731
    got = rerank_topk(sims, score_fn=fn, k_i2t=k_i2t, k_t2i=k_t2i, batch_size=batch_size, add_itc=add_itc)
    want = brute_force(sims, k_i2t, k_t2i, fn, add_itc)
    assert_close(got[0], want[0])
    assert_close(got[1], want[1])
    assert (torch.isfinite(got[0]).sum(1) == min(k_i2t, n_txt)).all()
    assert (torch.isfinite(got[1]).sum(1) == min(k_t2i, n_img)).all()


def test_single_k_is_both_directions():
    g = torch.Generator().manual_seed(3)
    sims = torch.randn(5, 9, generator=g)
    fn = lambda i, t: (i * 10 + t).float()  # noqa: E731
    one = rerank_topk(sims, 3, fn, batch_size=4)
    two = rerank_topk(sims, score_fn=fn, k_i2t=3, k_t2i=3)
    override = rerank_topk(sims, 3, fn, k_t2i=1)  # k for i2t, its own k for t2i
    for a, b in zip(one, two):
        assert torch.equal(a, b)
    assert torch.equal(override[0], one[0])
    assert (torch.isfinite(override[1]).sum(1) == 1).all()


def test_k_arguments_are_checked():
    sims = torch.randn(3, 4)
    fn = lambda i, t: i.float()  # noqa: E731
    with pytest.raises(ValueError, match="give k, or both k_i2t and k_t2i"):
        rerank_topk(sims, score_fn=fn, k_i2t=2)
    with pytest.raises(ValueError, match="not both 0"):
        rerank_topk(sims, score_fn=fn, k_i2t=0, k_t2i=0)
    with pytest.raises(ValueError, match="k_i2t and k_t2i must be >= 0"):
        rerank_topk(sims, score_fn=fn, k_i2t=-1, k_t2i=2)
    with pytest.raises(ValueError, match="needs a score_fn"):
        rerank_topk(sims, 2)


# -- the cached BertFusion path ------------------------------------------------------------

D, H, DV, LT, LI = 32, 4, 24, 19, 5  # LT > 16: batches of short captions are trimmed to 8 or 16


def tiny_case(n_img: int = 9, n_txt: int = 20):
    torch.manual_seed(0)
    fusion = BertFusion(D, 2, H, context_dim=DV, mlp_ratio=2.0, drop=0.0, attn_drop=0.0).eval()
    head = torch.nn.Linear(D, 2)
    g = torch.Generator().manual_seed(1)
    image_tokens = torch.randn(n_img, LI, DV, generator=g)
    text_tokens = torch.randn(n_txt, LT, D, generator=g)
    lengths = torch.randint(1, LT + 1, (n_txt,), generator=g)
    text_mask = torch.arange(LT)[None, :] < lengths[:, None]  # (Nt, LT) padded captions
    sims = torch.randn(n_img, n_txt, generator=g)
    return fusion, (lambda cls: head(cls)[:, 1]), sims, image_tokens, text_tokens, text_mask


@pytest.mark.parametrize(("k_i2t", "k_t2i", "image_batch", "batch_size"), [(4, 3, 2, 5), (1, 6, 4, 64), (5, 0, 1, 3)])
def test_cached_rerank_equals_plain_fusion(k_i2t, k_t2i, image_batch, batch_size):
    fusion, head, sims, image_tokens, text_tokens, text_mask = tiny_case()

    def plain(i: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return head(fusion(text_tokens[t], mask=text_mask[t], context=image_tokens[i])[:, 0])

    with torch.no_grad():
        want = rerank_topk(sims, score_fn=plain, k_i2t=k_i2t, k_t2i=k_t2i)
    widths, forward_cached = [], fusion.forward_cached

    def spy(text, context, **kwargs):  # record the caption width of every batch
        widths.append(text.tokens.shape[1])
        return forward_cached(text, context, **kwargs)

    fusion.forward_cached = spy
    got = rerank_with_cache(
        sims,
        fusion,
        image_tokens,
        text_tokens,
        text_mask,
        head,
        k_i2t=k_i2t,
        k_t2i=k_t2i,
        image_batch=image_batch,
        batch_size=batch_size,
    )
    assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    assert set(widths) <= {8, 16, LT}  # trimmed widths are multiples of 8
    if batch_size <= 5:  # small batches of sorted captions: some hold only short ones
        assert min(widths) < LT


def test_cached_rerank_with_image_mask_and_add_itc():
    fusion, head, sims, image_tokens, text_tokens, text_mask = tiny_case(5, 8)
    image_mask = torch.ones(5, LI, dtype=torch.bool)
    image_mask[[1, 3], 3:] = False

    def plain(i, t):
        fused = fusion(text_tokens[t], mask=text_mask[t], context=image_tokens[i], context_mask=image_mask[i])
        return head(fused[:, 0])

    with torch.no_grad():
        want = rerank_topk(sims, 3, plain, add_itc=True)
    got = rerank_with_cache(
        sims, fusion, image_tokens, text_tokens, text_mask, head, k=3, image_mask=image_mask, add_itc=True
    )
    assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)


def test_cached_rerank_bad_input():
    fusion, head, sims, image_tokens, text_tokens, text_mask = tiny_case(5, 8)
    with pytest.raises(ValueError, match=r"sims is \(5, 8\) but image_tokens \(4, 5, 24\)"):
        rerank_with_cache(sims, fusion, image_tokens[:4], text_tokens, text_mask, head, k=2)
    with pytest.raises(ValueError, match=r"head must return shape \(\d+,\)"):
        rerank_with_cache(sims, fusion, image_tokens, text_tokens, text_mask, lambda cls: cls, k=2)
    with pytest.raises(ValueError, match="image_batch must be >= 1"):
        rerank_with_cache(sims, fusion, image_tokens, text_tokens, text_mask, head, k=2, image_batch=0)


# -- METER's co-attention fusion, and all-pairs scoring ------------------------------------


def coattention_case(n_img: int = 6, n_txt: int = 11):
    torch.manual_seed(2)
    fusion = CoAttentionFusion(D, 2, H, mlp_ratio=2.0).eval()
    linear = torch.nn.Linear(2 * D, 2)
    head = lambda fused: linear(torch.cat([fused.text_tokens[:, 0], fused.image_tokens[:, 0]], -1))[:, 1]  # noqa: E731
    g = torch.Generator().manual_seed(4)
    image_tokens = torch.randn(n_img, LI, D, generator=g)
    text_tokens = torch.randn(n_txt, LT, D, generator=g)
    text_mask = torch.arange(LT)[None, :] < torch.randint(1, LT + 1, (n_txt,), generator=g)[:, None]
    sims = torch.randn(n_img, n_txt, generator=g)
    return fusion, head, sims, image_tokens, text_tokens, text_mask


def test_cached_rerank_and_all_pairs_with_coattention():
    fusion, head, sims, image_tokens, text_tokens, text_mask = coattention_case()

    def plain(i, t):
        return head(fusion(text_tokens[t], image_tokens[i], text_mask=text_mask[t]))

    with torch.no_grad():
        want = rerank_topk(sims, score_fn=plain, k_i2t=3, k_t2i=2)
        want_all = score_all_pairs(*sims.shape, plain, batch_size=7)
    got = rerank_with_cache(
        sims, fusion, image_tokens, text_tokens, text_mask, head, k_i2t=3, k_t2i=2, image_batch=4, batch_size=5
    )
    got_all = score_all_pairs_with_cache(
        fusion, image_tokens, text_tokens, text_mask, head, batch_size=7, image_batch=4
    )
    assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    assert got_all.shape == (6, 11) and got_all.dtype == torch.float32
    assert_close(got_all, want_all, rtol=1e-5, atol=1e-5)


def test_cached_all_pairs_with_bert_fusion():
    fusion, head, sims, image_tokens, text_tokens, text_mask = tiny_case(4, 7)

    def plain(i, t):
        return head(fusion(text_tokens[t], mask=text_mask[t], context=image_tokens[i])[:, 0])

    with torch.no_grad():
        want = score_all_pairs(4, 7, plain, batch_size=5)
    got = score_all_pairs_with_cache(fusion, image_tokens, text_tokens, text_mask, head, batch_size=5, image_batch=3)
    assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"text_mask is \(7, 5\), text_tokens \(7, 19, 32\)"):
        score_all_pairs_with_cache(fusion, image_tokens, text_tokens, text_mask[:, :5], head)
