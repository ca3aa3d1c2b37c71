"""The retrieval evaluator scores pairs through the fusion's caches when the model offers
them, with the same results as fusing every pair whole; k per direction."""

from __future__ import annotations

import pytest

from tests.models.test_albef import batch as albef_batch
from tests.models.test_albef import tiny_albef
from tests.models.test_meter import tiny_meter
from vlp.objectives import ITC, ITM, Retrieval


def _both(model, batches):
    cached = model.evaluate(batches)
    assert model.fused_pair_scorer(model.objectives["itm"].score) is not None
    model.fused_pair_scorer = lambda score: None  # fuse every pair whole
    plain = model.evaluate(batches)
    return cached, plain


def test_albef_reranking_through_the_cache_equals_the_plain_fusion():
    model = tiny_albef().eval()
    model.rerank_k = 3
    cached, plain = _both(model, [albef_batch(s) for s in range(3)])
    assert cached["scores"] == pytest.approx(plain["scores"], abs=1e-5)
    assert {"itm_i2t_r1", "itm_t2i_r1", "itm_acc"} <= set(cached["scores"])


@pytest.mark.parametrize("k", [None, 3])
def test_meter_retrieval_through_the_cache_equals_the_plain_fusion(k):
    objectives = [ITM(hard_negatives=False), Retrieval(k=k, negatives=2)] + ([ITC()] if k else [])
    model = tiny_meter(objectives=objectives).eval()
    batches = [dict(albef_batch(s), text_ids=albef_batch(s)["text_ids"] % 50) for s in range(2)]
    cached, plain = _both(model, batches)
    assert cached["scores"] == pytest.approx(plain["scores"], abs=1e-5)


def test_a_separate_k_per_direction():
    batches = [albef_batch(s) for s in range(3)]
    model = tiny_albef(rerank_k=1, rerank_k_t2i=12).eval()
    scores = model.evaluate(batches)["scores"]
    full = tiny_albef(rerank_k=12).eval().evaluate(batches)["scores"]
    # one candidate per image: re-ranking cannot change image→text R@1
    assert scores["itm_i2t_r1"] == scores["i2t_r1"]
    # all 12 images per caption: text→image is the full ITM ranking, as with k=12 both ways
    assert {k: v for k, v in scores.items() if k.startswith("itm_t2i")} == pytest.approx(
        {k: v for k, v in full.items() if k.startswith("itm_t2i")}
    )
