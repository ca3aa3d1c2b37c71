"""ALBEF two-stage retrieval: ITC top-k candidates re-ranked by a pair scorer (ITM)."""

from __future__ import annotations

import math

import pytest
import torch

from vlp.eval import chance_recall, format_rerank_table, format_table, recall_at_k, rerank_topk, retrieval_scores


class Recorder:
    """A pair scorer that counts its calls and remembers every pair it scored."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.calls = 0
        self.pairs: list[tuple[int, int]] = []
        self.sizes: list[int] = []

    def __call__(self, i: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert i.dtype == torch.long and t.dtype == torch.long and i.shape == t.shape
        self.calls += 1
        self.sizes.append(len(i))
        self.pairs += list(zip(i.tolist(), t.tolist()))
        return self.fn(i, t)


def perfect(owner: torch.Tensor) -> Recorder:
    """1 for a matching (image, text) pair, 0 otherwise."""
    return Recorder(lambda i, t: (owner[t] == i).float())


def five_caption_case() -> tuple[torch.Tensor, torch.Tensor]:
    """3 images x 15 texts, text t belongs to image t // 5; ITC ranks worked out in the tests."""
    owner = torch.arange(3).repeat_interleave(5)  # (15,)
    t = torch.arange(15, dtype=torch.float32)
    sims = -0.001 * t[None, :] - 0.0001 * torch.arange(3.0)[:, None]  # (3, 15) tie-free baseline
    sims[0, 5], sims[0, 6], sims[0, 0] = 0.9, 0.8, 0.7  # img0: t5, t6 (img1's) above own t0
    sims[1, 5] = 0.95  # img1: own t5 first
    sims[2, 1], sims[2, 12] = 0.6, 0.4  # img2: t1 (img0's) above own t12
    return sims, owner


def test_perfect_scorer_fixes_topk_only():
    """With a perfect scorer, re-ranked R@1 = ITC R@k (a positive in the top-k moves to the
    front) and re-ranked R@K = ITC R@K for K >= k (nothing outside the top-k is rescued)."""
    torch.manual_seed(0)
    n_img, c = 30, 3
    owner = torch.arange(n_img).repeat_interleave(c)  # (90,)
    sims = torch.randn(n_img, n_img * c) + 1.5 * (owner[None, :] == torch.arange(n_img)[:, None])  # (30, 90)
    ks = (1, 2, 3, 5, 10)
    itc = recall_at_k(sims, owner, ks)
    assert 0 < itc["i2t_r1"] < 100 and 0 < itc["t2i_r1"] < 100  # ITC makes mistakes
    for k in (1, 3, 5):
        r = retrieval_scores(sims, owner, rerank_topk(sims, k, perfect(owner)), ks)
        for d in ("i2t", "t2i"):
            assert r[f"itm_{d}_r1"] == pytest.approx(itc[f"{d}_r{k}"])
            for kk in ks:
                if kk >= k:
                    assert r[f"itm_{d}_r{kk}"] == pytest.approx(itc[f"{d}_r{kk}"])
        assert {key: v for key, v in r.items() if not key.startswith("itm_")} == itc
    r1 = retrieval_scores(sims, owner, rerank_topk(sims, 1, perfect(owner)), ks)
    assert r1["itm_i2t_r1"] == itc["i2t_r1"] and r1["itm_t2i_r1"] == itc["t2i_r1"]


def test_scores_outside_topk_are_minus_inf():
    sims, owner = five_caption_case()
    i2t, t2i = rerank_topk(sims, 2, perfect(owner))
    assert i2t.shape == (3, 15) and t2i.shape == (15, 3)
    assert (torch.isfinite(i2t).sum(1) == 2).all() and (torch.isfinite(t2i).sum(1) == 2).all()
    assert torch.isfinite(i2t[0, [5, 6]]).all() and i2t[0, 0] == float("-inf")  # own t0 is 3rd by ITC
    assert i2t[2, 12] == 1.0 and i2t[2, 1] == 0.0


def test_each_pair_scored_once_in_chunks():
    torch.manual_seed(1)
    n_img, n_txt, k, bs = 12, 40, 5, 7
    sims = torch.randn(n_img, n_txt)
    rec = Recorder(lambda i, t: sims[i, t] * 2)
    i2t, t2i = rerank_topk(sims, k, rec, batch_size=bs)
    top_t = sims.topk(k, dim=1).indices
    top_i = sims.T.topk(k, dim=1).indices
    union = {(i, t) for i in range(n_img) for t in top_t[i].tolist()}
    union |= {(i, t) for t in range(n_txt) for i in top_i[t].tolist()}
    assert len(rec.pairs) == len(set(rec.pairs)) == len(union)  # no pair twice
    assert set(rec.pairs) == union
    assert len(union) < n_img * k + n_txt * k  # some pairs were shared by both directions
    assert rec.calls == math.ceil(len(union) / bs) and max(rec.sizes) <= bs
    # a shared pair gets the same score in both matrices
    for i, t in union:
        if t in top_t[i].tolist() and i in top_i[t].tolist():
            assert i2t[i, t] == t2i[t, i] == sims[i, t] * 2


def test_five_captions_per_image_by_hand():
    sims, owner = five_caption_case()
    ks = (1, 2, 3)
    r = retrieval_scores(sims, owner, rerank_topk(sims, 2, perfect(owner)), ks)
    # ITC image→text: best own caption at rank 2 (img0: t5, t6, t0), 0 (img1), 1 (img2: t1, t12)
    assert r["i2t_r1"] == pytest.approx(100 / 3)
    assert r["i2t_r2"] == pytest.approx(200 / 3)
    assert r["i2t_r3"] == pytest.approx(100.0)
    # ITC text→image, owner rank: 0 for t0, t2-t4, t5, t12; 1 for t1, t6-t9; 2 for t10, t11, t13, t14
    assert r["t2i_r1"] == pytest.approx(100 * 6 / 15)
    assert r["t2i_r2"] == pytest.approx(100 * 11 / 15)
    assert r["t2i_r3"] == pytest.approx(100.0)
    # k=2: img0's top-2 are both wrong (t0 stays 3rd), img2's t12 moves to the front
    assert r["itm_i2t_r1"] == pytest.approx(200 / 3)
    assert r["itm_i2t_r2"] == pytest.approx(200 / 3)
    assert r["itm_i2t_r3"] == pytest.approx(100.0)
    # every text whose owner is in its ITC top-2 is fixed; owner 3rd stays 3rd
    assert r["itm_t2i_r1"] == pytest.approx(100 * 11 / 15)
    assert r["itm_t2i_r2"] == pytest.approx(100 * 11 / 15)
    assert r["itm_t2i_r3"] == pytest.approx(100.0)
    itm = [v for key, v in r.items() if key.startswith("itm_") and key != "itm_rmean"]
    assert len(itm) == 6 and r["itm_rmean"] == pytest.approx(sum(itm) / 6)
    # k=3 covers every image: text→image becomes perfect, and so does image→text here
    r3 = retrieval_scores(sims, owner, rerank_topk(sims, 3, perfect(owner)), ks)
    assert r3["itm_i2t_r1"] == r3["itm_t2i_r1"] == 100.0


def test_add_itc_changes_the_order():
    sims = torch.tensor([[0.9, 0.5, 0.1], [0.0, 0.0, 0.0]])  # (2, 3)
    owner = torch.tensor([0, 1, 1])
    itm = torch.tensor([0.5, 0.6, 0.7])  # favours text 2 for every image
    fn = lambda i, t: itm[t]  # noqa: E731
    i2t, _ = rerank_topk(sims, 3, fn)
    assert i2t[0].argsort(descending=True).tolist() == [2, 1, 0]  # ITM alone
    i2t_add, t2i_add = rerank_topk(sims, 3, fn, add_itc=True)
    assert torch.allclose(i2t_add, itm[None, :] + sims)  # (2, 3)
    assert torch.allclose(t2i_add, (itm[None, :] + sims).T)
    assert i2t_add[0].argsort(descending=True).tolist() == [0, 1, 2]  # 1.4, 1.1, 0.8
    assert retrieval_scores(sims, owner, (i2t, _))["itm_i2t_r1"] == 50.0  # img0 picks t2 (img1's)
    assert retrieval_scores(sims, owner, (i2t_add, t2i_add))["itm_i2t_r1"] == 100.0


def test_k_larger_than_candidates():
    sims = torch.randn(3, 4)
    owner = torch.tensor([0, 1, 2, 2])
    rec = perfect(owner)
    i2t, t2i = rerank_topk(sims, 100, rec, batch_size=5)
    assert torch.isfinite(i2t).all() and torch.isfinite(t2i).all()
    assert sorted(rec.pairs) == [(i, t) for i in range(3) for t in range(4)]  # all 12 pairs, once each
    assert rec.sizes == [5, 5, 2]
    r = retrieval_scores(sims, owner, (i2t, t2i))
    assert all(r[f"itm_{d}_r{k}"] == 100.0 for d in ("i2t", "t2i") for k in (1, 5, 10))


def test_bad_arguments():
    sims = torch.randn(3, 4)
    with pytest.raises(ValueError, match="k must be"):
        rerank_topk(sims, 0, lambda i, t: i.float())
    with pytest.raises(ValueError, match="score_fn must return"):
        rerank_topk(sims, 2, lambda i, t: i.float()[:, None])
    with pytest.raises(ValueError, match="reranked must be"):
        retrieval_scores(sims, torch.tensor([0, 1, 2, 2]), (sims, sims))


def test_rerank_table_rows():
    sims, owner = five_caption_case()
    r = retrieval_scores(sims, owner, rerank_topk(sims, 2, perfect(owner)))
    r["itm_acc"] = 88.0  # extra keys (as logged by the model) are ignored
    chance = chance_recall(3, 15)
    text = format_rerank_table(r, chance, title="toy", k=2)
    lines = text.splitlines()
    assert lines[0] == "toy"
    assert sum(line.strip().startswith("ITC+ITM@2") for line in lines) == 3  # i2t, t2i, mean
    assert sum(line.strip().startswith("ITC ") for line in lines) == 3
    assert sum(line.strip().startswith("chance") for line in lines) == 3
    assert "image→text" in text and "text→image" in text and "mean R@K" in text
    assert f"{r['itm_rmean']:.2f}" in text and f"{chance['rmean']:.2f}" in text
    assert all(f"R@{k}" in lines[1] for k in (1, 5, 10))
    # no re-ranking: ITC rows only; the old table is unchanged
    plain = format_rerank_table(retrieval_scores(sims, owner))
    assert "ITC+ITM" not in plain and "chance" not in plain
    old = format_table(recall_at_k(torch.eye(4), torch.arange(4)), chance_recall(4, 4), title="toy")
    assert old == (
        "toy\n"
        "                    R@1      R@5     R@10\n"
        "image→text       100.00   100.00   100.00\n"
        "  chance          25.00   100.00   100.00\n"
        "text→image       100.00   100.00   100.00\n"
        "  chance          25.00   100.00   100.00\n"
        "mean R@K         100.00   (chance 75.00)"
    )
