"""The Retrieval task head ("irtr") and task heads shared across fusion families: negatives
never of the query's own id, the ranking loss by hand, gradients, all-pairs evaluation
against a hand-built score matrix, ITC-top-k evaluation equal to ALBEF's own, and the
VQA / NLVR2 heads fine-tuning and evaluating an ALBEF as they do a METER."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.models.test_albef import batch as albef_batch
from tests.models.test_albef import tiny_albef
from tests.models.test_meter import B, L, V, task_batches, tiny_meter
from tests.models.test_meter import D as METER_D
from vlp.errors import ConfigError
from vlp.eval.retrieval import recall_at_k
from vlp.objectives import ITM, NLVR2, VQA, MomentumITC, Retrieval


def retrieval_batch(seed: int = 0, captions: int = 2) -> dict:
    """B images with ``captions`` captions each (retrieval modality: T = B x captions)."""
    g = torch.Generator().manual_seed(seed)
    t = B * captions
    mask = torch.ones(t, L, dtype=torch.long)
    mask[1, 5:] = 0
    return {
        "modality": "retrieval",
        "image": torch.randn(B, 3, 32, 32, generator=g),
        "image_id": torch.arange(B) + 10 * seed,
        "text_ids": torch.randint(5, V, (t, L), generator=g),
        "text_mask": mask,
        "text_image_id": (torch.arange(B) + 10 * seed).repeat_interleave(captions),
    }


def meter_with_retrieval(**kwargs):
    return tiny_meter(objectives=[ITM(dim=2 * METER_D, hard_negatives=False), Retrieval(**kwargs)])


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_candidates_put_the_positive_first_and_never_a_same_id_negative(direction):
    head = Retrieval(negatives=3, direction=direction)
    image_id = torch.tensor([5, 6, 7, 8])
    text_image_id = torch.tensor([5, 5, 6, 7, 7, 8])  # 6 captions, two images with two each
    torch.manual_seed(0)
    for _ in range(20):
        images, texts = head.candidates(image_id, text_image_id)
        assert images.shape == texts.shape == ((4, 4) if direction == "i2t" else (6, 4))
        owner = image_id[images] == text_image_id[texts]  # (Q, 1 + n) caption belongs to image
        assert owner[:, 0].all() and not owner[:, 1:].any()
        if direction == "i2t":  # each image once, with distinct negatives
            assert images[:, 0].tolist() == [0, 1, 2, 3]
            assert all(len(set(row)) == 4 for row in texts.tolist())


def test_negatives_shrink_to_what_the_batch_allows():
    head = Retrieval(negatives=15, direction="i2t")
    images, texts = head.candidates(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 2, 3]))
    assert images.shape == (3, 3)  # image 2 has only two captions of other ids
    one_id = head.candidates(torch.tensor([1, 1]), torch.tensor([1, 1]))
    assert one_id[0].shape == (2, 1)  # nothing to rank against: the loss is zero, not an error
    with pytest.raises(ConfigError, match="image_id is not among"):
        head.candidates(torch.tensor([1, 2]), torch.tensor([1, 3]))


def test_bad_settings_and_a_missing_scorer_are_clear_errors():
    with pytest.raises(ConfigError, match="direction"):
        Retrieval(direction="both")
    with pytest.raises(ConfigError, match="at least one negative"):
        Retrieval(negatives=0)
    with pytest.raises(ConfigError, match="add vlp.objectives.ITM"):  # when the model is built
        tiny_meter(objectives=[Retrieval()])


def test_ranking_loss_by_hand_and_every_parameter_gets_a_gradient():
    model = meter_with_retrieval(negatives=3)
    model.eval()  # no dropout: the hand computation repeats the forward pass
    b = retrieval_batch()
    head, itm = model.objectives["irtr"], model.objectives["itm"]
    torch.manual_seed(1)
    loss = model.training_step(b, 0)  # a retrieval batch trains the ranking loss only
    torch.manual_seed(1)
    images, texts = head.candidates(b["image_id"], b["text_image_id"])
    with torch.no_grad():
        out = model(b)
        want = []
        for q in range(images.shape[0]):
            fused = model.match_features(
                out.text_tokens[texts[q]], out.text_mask[texts[q]], out.image_tokens[images[q]]
            )
            logits = itm.head(fused)[:, 1]  # the match logit of the 1 + 3 candidates
            want.append(-F.log_softmax(logits, 0)[0])
    torch.testing.assert_close(loss.detach(), torch.stack(want).mean())
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None and not n.startswith("token_type")]
    assert not missing, missing


def test_fine_tuning_ranks_better_on_a_fixed_batch():
    model = meter_with_retrieval(negatives=3)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    b = retrieval_batch(captions=1)
    model.eval()  # no dropout: a clean overfitting check
    torch.manual_seed(0)  # the negatives drawn
    losses = []
    for _ in range(60):
        loss = model.training_step(b, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[0] == pytest.approx(torch.log(torch.tensor(4.0)).item(), abs=0.1)  # 1 of 4 candidates
    assert sum(losses[-10:]) / 10 < 0.5 * losses[0], losses  # the positive now ranks first


def test_all_pairs_evaluation_equals_a_hand_built_score_matrix(capsys):
    model = meter_with_retrieval()
    model.eval()
    batches = [retrieval_batch(0), retrieval_batch(1)]
    for b in batches:
        model.test_step(b, 0)
    model.on_test_epoch_end()
    result = model.results["test"]
    assert result["task"] == "irtr"
    # by hand: every image of the split against every caption
    itm = model.objectives["itm"]
    with torch.no_grad():
        outs = [model(b) for b in batches]
        images = torch.cat([o.image_tokens for o in outs])  # (8, Li, D), ids 0-3 then 10-13
        sims = torch.zeros(2 * B, 4 * B)
        texts = [(o, i) for o in outs for i in range(len(o.text_tokens))]
        for j, (o, i) in enumerate(texts):
            fused = model.match_features(
                o.text_tokens[i : i + 1].expand(2 * B, -1, -1), o.text_mask[i : i + 1].expand(2 * B, -1), images
            )
            sims[:, j] = itm.score(fused)
    index = torch.arange(2 * B).repeat_interleave(2)
    want = recall_at_k(sims, index)
    for key, value in want.items():
        assert result["scores"][key] == pytest.approx(value), key
    assert result["chance"]["t2i_r1"] == pytest.approx(100 / 8)
    assert "ITM over all 128 pairs" in capsys.readouterr().out
    # max_images: the first 4 image ids and their 8 captions
    model.objectives["irtr"].max_images = 4
    for b in batches:
        model.test_step(b, 0)
    model.on_test_epoch_end()
    want = recall_at_k(sims[:4, :8], index[:8])
    for key, value in want.items():
        assert model.results["test"]["scores"][key] == pytest.approx(value), key
    assert "the first 4 of 8 images: 4 images, 8 texts; ITM over all 32 pairs" in capsys.readouterr().out


def test_itc_top_k_evaluation_equals_albefs_own():
    """With ITC features the head re-ranks the ITC top-k like ALBEF's built-in evaluation."""
    plain = tiny_albef()
    plain.rerank_k = 3
    headed = tiny_albef(objectives=[MomentumITC(queue_size=8, embed_dim=16), ITM(dim=32), Retrieval(k=3)])
    headed.load_state_dict(plain.state_dict(), strict=False)
    for model in (plain, headed):
        model.eval()
        for seed in (0, 1):
            model.test_step(albef_batch(seed), 0)
        model.on_test_epoch_end()
    own, head = plain.results["test"]["scores"], headed.results["test"]["scores"]
    assert headed.results["test"]["task"] == "irtr"
    for key in ("i2t_r1", "t2i_r1", "rmean", "itm_i2t_r1", "itm_t2i_r1", "itm_i2t_r5", "itm_rmean"):
        assert head[key] == pytest.approx(own[key]), key


def test_task_heads_fine_tune_and_evaluate_albef_too(capsys):
    """VQA and NLVR2 read ALBEF's fused CLS exactly as they read METER's pooled streams."""
    dim = 32
    model = tiny_albef(objectives=[VQA(dim=dim, answers=["yes", "no", "red", "blue"]), NLVR2(dim=dim)])
    batches = task_batches()
    vqa, nlvr2 = batches["vqa"], batches["nlvr2"]
    model.train()
    for b, name in ((vqa, "vqa"), (nlvr2, "nlvr2")):
        model.zero_grad()
        model.training_step(b, 0).backward()
        head = model.objectives[name]
        assert all(p.grad is not None for p in head.parameters())
        assert model.fusion.blocks[0].cross_attn.q.weight.grad is not None
    model.eval()
    model.validation_step(vqa, 0)
    model.test_step(nlvr2, 0)
    model.on_validation_epoch_end()
    model.on_test_epoch_end()
    assert model.results["val"]["task"] == "vqa" and "overall" in model.results["val"]["scores"]
    assert model.results["test"]["task"] == "nlvr2" and 0 <= model.results["test"]["scores"]["acc"] <= 100
    assert "nlvr2 (ALBEF)" in capsys.readouterr().out
