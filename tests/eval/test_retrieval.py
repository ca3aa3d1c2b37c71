"""Retrieval R@K over a whole split, several captions per image."""

from __future__ import annotations

from math import comb

import pytest
import torch

from vlp.eval.retrieval import RetrievalMetric, chance_recall, format_table, recall_at_k


def test_recall_at_k_hand_computed():
    # 3 images, 2 captions each (texts 0,1 -> img 0; 2,3 -> img 1; 4,5 -> img 2)
    sims = torch.tensor(
        [
            [0.9, 0.1, 0.8, 0.0, 0.0, 0.0],  # img0: best text 0 (own)       -> i2t rank 0
            [0.0, 0.0, 0.1, 0.2, 0.9, 0.3],  # img1: own texts at ranks 3, 2 -> best rank 2
            [0.5, 0.0, 0.0, 0.0, 0.1, 0.05],  # img2: own texts 4 (rank 1)    -> rank 1
        ]
    )
    owner = torch.tensor([0, 0, 1, 1, 2, 2])
    r = recall_at_k(sims, owner, ks=(1, 2, 3))
    assert r["i2t_r1"] == pytest.approx(100 / 3)
    assert r["i2t_r2"] == pytest.approx(200 / 3)
    assert r["i2t_r3"] == pytest.approx(100.0)
    # t2i: columns: t0 -> img0 best (0.9) ok; t1 -> img0 (0.1) best? col1 = [0.1, 0, 0] ok;
    # t2 -> [0.8, 0.1, 0] best img0, own img1 second; t3 -> [0, 0.2, 0] ok;
    # t4 -> [0, 0.9, 0.1] own img2 second; t5 -> [0, 0.3, 0.05] own img2 second
    assert r["t2i_r1"] == pytest.approx(300 / 6)
    assert r["t2i_r2"] == pytest.approx(100.0)
    assert r["rmean"] == pytest.approx(sum(v for k, v in r.items() if k != "rmean") / 6)


def test_chance_formulas():
    c = chance_recall(100, 500)
    assert c["t2i_r1"] == pytest.approx(1.0)
    assert c["t2i_r5"] == pytest.approx(5.0)
    assert c["i2t_r1"] == pytest.approx(100 * 5 / 500)
    assert c["i2t_r10"] == pytest.approx(100 * (1 - comb(495, 10) / comb(500, 10)))


def test_random_embeddings_score_near_chance():
    torch.manual_seed(0)
    n, c = 200, 5
    metric = RetrievalMetric()
    img = torch.nn.functional.normalize(torch.randn(n, 32), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(n * c, 32), dim=-1)
    metric.update(img, torch.arange(n), txt, torch.arange(n).repeat_interleave(c))
    r = metric.compute()
    chance = chance_recall(n, n * c)
    assert abs(r["t2i_r10"] - chance["t2i_r10"]) < 3.0
    assert abs(r["i2t_r10"] - chance["i2t_r10"]) < 8.0


def test_metric_dedupes_images_and_maps_ids():
    """Batches may repeat an image (pair data); ids need not be contiguous."""
    metric = RetrievalMetric()
    e = torch.eye(3)
    metric.update(e[[0, 1]], torch.tensor([10, 30]), e[[0, 1]], torch.tensor([10, 30]))
    metric.update(e[[1, 2]], torch.tensor([30, 20]), e[[2]], torch.tensor([20]))
    r = metric.compute()
    assert r["num_images"] == 3 and r["num_texts"] == 3
    assert r["i2t_r1"] == 100.0 and r["t2i_r1"] == 100.0


def test_unknown_text_owner_is_an_error():
    metric = RetrievalMetric()
    metric.update(torch.eye(2), torch.tensor([0, 1]), torch.eye(2), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="not in the evaluation set"):
        metric.compute()


def test_format_table_mentions_chance():
    r = recall_at_k(torch.eye(4), torch.arange(4))
    text = format_table(r, chance_recall(4, 4), title="toy")
    assert "toy" in text and "chance" in text and "100.00" in text
