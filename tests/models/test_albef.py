"""ALBEF: objectives against hand-computed values, momentum/queue updates only in training,
hard negatives, gradients reaching every parameter."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_bert

from vlp.encoders import BertFusion, TimmVisionEncoder
from vlp.errors import ConfigError
from vlp.models import ALBEF
from vlp.objectives import ITM, MLM, MomentumITC
from vlp.objectives.itm import sample_negatives
from vlp.objectives.momentum_itc import soft_cross_entropy

V, D, E, B, L, Q = 50, 32, 16, 4, 7, 8


def tiny_albef(**kwargs) -> ALBEF:
    torch.manual_seed(0)
    image = TimmVisionEncoder(
        "vit_tiny_patch16_224",
        img_size=32,
        pool="cls",
        model_kwargs=dict(patch_size=16, embed_dim=D, depth=1, num_heads=2),
    )
    text = tiny_bert(V, D)
    fusion = BertFusion(D, 1, 2, context_dim=D, mlp_ratio=2.0, drop=0.0, attn_drop=0.0)
    objectives = kwargs.pop("objectives", None) or [
        MomentumITC(queue_size=Q, embed_dim=E),
        ITM(dim=D),
        MLM(dim=D, vocab_size=V),
    ]
    return ALBEF(image, text, fusion, objectives, embed_dim=E, **kwargs)


def batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 5:] = 0
    labels = torch.full((B, L), -100)
    labels[:, 2] = ids[:, 2]
    mlm_ids = ids.clone()
    mlm_ids[:, 2] = 3  # [MASK]
    return {
        "modality": "pair",
        "image": torch.randn(B, 3, 32, 32, generator=g),
        "text_ids": ids,
        "text_mask": mask,
        "image_id": torch.arange(B) + 100 * seed,
        "text_image_id": torch.arange(B) + 100 * seed,
        "mlm_input_ids": mlm_ids,
        "mlm_labels": labels,
    }


def test_every_parameter_gets_a_gradient():
    model = tiny_albef()
    model.train()
    loss = model.training_step(batch(), 0)
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in trainable if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.split(".")[0].endswith("_m") or ".head_m." in n for n in frozen)


def test_soft_cross_entropy_by_hand():
    logits = torch.tensor([[1.0, 2.0, 0.0]])
    targets = torch.tensor([[0.5, 0.5, 0.0]])
    z = math.log(math.e + math.e**2 + 1)
    expected = -(0.5 * (1 - z) + 0.5 * (2 - z))
    assert soft_cross_entropy(logits, targets).item() == pytest.approx(expected, rel=1e-6)


def test_momentum_itc_against_hand_computed_value():
    itc = MomentumITC(queue_size=2, embed_dim=2, temperature=0.5, distill=True)
    itc.image_queue.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))  # columns are features
    itc.text_queue.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    out = type("O", (), {})()
    out.image_embeds = out.image_embeds_m = torch.tensor([[1.0, 0.0]])
    out.text_embeds = out.text_embeds_m = torch.tensor([[0.6, 0.8]])
    model = type("M", (), {"distill_alpha": 0.4})()
    got = itc(out, {}, model)["itc_loss"].item()

    def direction(a, b_m, queue):
        cols = torch.cat([b_m.T, queue], dim=1)  # (E, 1 + Q)
        sims = a @ cols / 0.5  # (1, 1 + Q)
        soft = F.softmax(a @ cols / 0.5, dim=1)  # a equals its momentum copy here
        target = 0.4 * soft + 0.6 * torch.tensor([[1.0, 0.0, 0.0]])
        return -(target * F.log_softmax(sims, dim=1)).sum()

    expected = (
        direction(out.image_embeds, out.text_embeds_m, itc.text_queue)
        + direction(out.text_embeds, out.image_embeds_m, itc.image_queue)
    ) / 2
    assert got == pytest.approx(expected.item(), rel=1e-6)


def test_queue_and_ema_update_in_training_only():
    model = tiny_albef()
    itc = model.objectives["itc"]
    queue_before = itc.image_queue.clone()
    ema_before = model.image_proj_m.weight.clone()
    model.eval()
    with torch.no_grad():
        model.validation_step(batch(), 0)
    assert torch.equal(itc.image_queue, queue_before) and int(itc.queue_ptr) == 0
    assert torch.equal(model.image_proj_m.weight, ema_before)
    model.train()
    loss = model.training_step(batch(), 0)
    assert torch.equal(itc.image_queue, queue_before)  # forward leaves the queue alone
    loss.backward()
    with torch.no_grad():
        model.image_proj.weight.add_(1.0)  # an "optimiser step"
    model.after_optimizer_step()
    assert int(itc.queue_ptr) == B
    assert not torch.equal(itc.image_queue[:, :B], queue_before[:, :B])
    assert torch.equal(itc.image_queue[:, B:], queue_before[:, B:])
    expected = 0.995 * ema_before + 0.005 * model.image_proj.weight
    torch.testing.assert_close(model.image_proj_m.weight, expected)
    assert (itc.idx_queue[:B] == -100).all()  # diagonal positives keep no ids


@pytest.mark.parametrize("positives", ["same_id", "same_text"])
def test_queue_positives_by_id_or_identical_caption(positives):
    itc = MomentumITC(queue_size=4, embed_dim=2, temperature=0.5, distill=False, positives=positives)
    b = {
        "image_id": torch.tensor([7, 8]),
        "text_ids": torch.tensor([[1, 5, 6], [1, 5, 9]]),
        "text_mask": torch.ones(2, 3, dtype=torch.long),
    }
    out = type("O", (), {})()
    out.image_embeds = out.image_embeds_m = F.normalize(torch.randn(2, 2), dim=-1)
    out.text_embeds = out.text_embeds_m = F.normalize(torch.randn(2, 2), dim=-1)
    itc.train()
    itc(out, b, None)
    itc.after_optimizer_step(None)
    ids = itc.sample_ids(b)
    assert torch.equal(itc.idx_queue[:2], ids) and ids[0] != ids[1]
    # the same batch again: each row now has 2 positives (itself and its queued copy)
    loss = itc(out, b, None)["itc_loss"]
    hard = torch.zeros(2, 6)
    hard[0, [0, 2]] = hard[1, [1, 3]] = 0.5
    text_all = torch.cat([out.text_embeds_m.T, itc.text_queue], 1)
    image_all = torch.cat([out.image_embeds_m.T, itc.image_queue], 1)
    expected = (
        soft_cross_entropy(2 * out.image_embeds @ text_all, hard)
        + soft_cross_entropy(2 * out.text_embeds @ image_all, hard)
    ) / 2
    torch.testing.assert_close(loss, expected)


def test_hard_negatives_never_pick_the_positive_or_the_same_id():
    torch.manual_seed(0)
    n = 6
    weights = torch.rand(n, n) + 10 * torch.eye(n)  # the positive is by far the most similar
    ids = torch.tensor([0, 0, 1, 2, 3, 3])
    forbidden = ids[:, None] == ids[None, :]
    for _ in range(50):
        neg = sample_negatives(weights, forbidden)
        assert not forbidden[torch.arange(n), neg].any()


def test_hard_negatives_follow_the_similarity():
    weights = torch.tensor([[0.0, 0.9, 0.1], [0.5, 0.0, 0.5], [0.0, 1.0, 0.0]])
    forbidden = torch.eye(3, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    picks = torch.stack([sample_negatives(weights, forbidden, g) for _ in range(400)])  # (400, 3)
    assert (picks[:, 0] == 1).float().mean() > 0.8
    assert (picks[:, 2] == 1).all()


def test_no_negative_available_is_a_clear_error():
    with pytest.raises(ValueError, match="no negative"):
        sample_negatives(torch.ones(2, 2), torch.ones(2, 2, dtype=torch.bool))


def test_itm_loss_by_hand():
    model = tiny_albef(objectives=[ITM(dim=D, hard_negatives=False)], use_momentum=False)
    model.train()
    b = batch()
    out = model(b)
    torch.manual_seed(1)
    itm = model.objectives["itm"]
    got = itm(out, b, model)
    torch.manual_seed(1)
    neg_image, neg_text = itm.negatives(out, b, model)
    pos = out.fused_cls
    neg1 = model.fuse(out.text_tokens, out.text_mask, out.image_tokens[neg_image])[:, 0]
    neg2 = model.fuse(out.text_tokens[neg_text], out.text_mask[neg_text], out.image_tokens)[:, 0]
    logits = itm.head(torch.cat([pos, neg1, neg2]))
    labels = torch.tensor([1] * B + [0] * 2 * B)
    torch.testing.assert_close(got["itm_loss"], F.cross_entropy(logits, labels))


def test_mlm_loss_by_hand_without_distillation():
    model = tiny_albef(objectives=[MLM(dim=D, vocab_size=V, distill=False)], use_momentum=False)
    model.eval()
    b = batch()
    out = model(b)
    got = model.objectives["mlm"](out, b, model)["mlm_loss"]
    hidden = model.fuse(model.text_encoder(b["mlm_input_ids"], b["text_mask"]).tokens, b["text_mask"], out.image_tokens)
    head = model.objectives["mlm"].head
    logits = F.layer_norm(F.gelu(head.dense(hidden[:, 2])), (D,), head.norm.weight, head.norm.bias, 1e-12)
    logits = logits @ model.text_encoder.model.get_input_embeddings().weight.T + head.bias
    torch.testing.assert_close(got, F.cross_entropy(logits, b["mlm_labels"][:, 2]))


def test_mlm_distillation_mixes_soft_targets():
    model = tiny_albef()
    model.train()
    model.alpha_ramp_steps = None
    b = batch()
    out = model(b)
    mlm = model.objectives["mlm"]
    full = mlm(out, b, model)["mlm_loss"]
    model.alpha = 0.0
    hard = mlm(out, b, model)["mlm_loss"]
    assert not torch.isclose(full, hard)


@pytest.mark.parametrize(
    "objective", [lambda: MomentumITC(queue_size=Q, embed_dim=E), lambda: MLM(dim=D, vocab_size=V)]
)
def test_objectives_that_need_momentum_refuse_a_model_without_it(objective):
    with pytest.raises(ConfigError, match="momentum"):
        tiny_albef(objectives=[objective()], use_momentum=False)


def test_queue_size_must_be_a_multiple_of_the_batch():
    model = tiny_albef(objectives=[MomentumITC(queue_size=6, embed_dim=E)])
    model.train()
    model.training_step(batch(), 0)
    with pytest.raises(ConfigError, match="multiple"):
        model.after_optimizer_step()


def test_retrieval_evaluation_with_itm_reranking(capsys):
    model = tiny_albef()
    model.rerank_k = 3
    model.eval()
    result = model.evaluate([batch(0), batch(1)])
    assert result["num_images"] == 2 * B and result["num_texts"] == 2 * B
    scores = result["scores"]
    for key in ("i2t_r1", "t2i_r1", "rmean", "itm_i2t_r1", "itm_t2i_r1", "itm_rmean", "itm_acc"):
        assert key in scores and 0 <= scores[key] <= 100, key
    assert scores["itm_i2t_r10"] == scores["i2t_r10"] == 100  # 8 candidates: everything is in the top 10
    out = capsys.readouterr().out
    assert "ITC+ITM" in out and "chance" in out
    assert not model._evaluators  # the stored features are released


def test_text_hash_ignores_padding_length():
    from vlp.objectives.momentum_itc import text_hash

    ids = torch.tensor([[101, 7, 8, 102]])
    short = text_hash(ids, torch.ones(1, 4, dtype=torch.long))
    padded = text_hash(torch.tensor([[101, 7, 8, 102] + [0] * 96]), torch.tensor([[1] * 4 + [0] * 96]))
    other = text_hash(torch.tensor([[101, 8, 7, 102]]), torch.ones(1, 4, dtype=torch.long))
    assert torch.equal(short, padded) and not torch.equal(short, other)


def _fit_on(model, batches: list[dict], **trainer_kwargs):
    from helpers import quiet_trainer

    trainer = quiet_trainer(max_epochs=1, **trainer_kwargs)
    trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return trainer


def test_accumulated_micro_batches_all_join_the_queue_and_the_ema_follows_the_steps():
    """accumulate_grad_batches 2 over 4 batches: 4 batches queued, 2 EMA updates (one per step)."""
    model = tiny_albef(momentum=0.5)
    itc = model.objectives["itc"]
    itc.queue_size = 4 * B
    itc.image_queue = torch.zeros(E, 4 * B)
    itc.text_queue = torch.zeros(E, 4 * B)
    itc.idx_queue = torch.full((4 * B,), -100)
    updates = []
    model.momentum_update = lambda m: updates.append(model.trainer.global_step)
    trainer = _fit_on(model, [batch(s) for s in range(4)], accumulate_grad_batches=2)
    assert trainer.global_step == 2 and len(updates) == 2  # one EMA update per optimiser step
    assert int(itc.queue_ptr) == 0  # 4 batches of B went round the 4 * B queue once
    assert (itc.image_queue.abs().sum(0) > 0).all()  # every slot holds a queued feature


def test_a_skipped_nonfinite_step_leaves_queue_and_momentum_copies_alone():
    """optim.max_nonfinite_steps 1 and a NaN loss: no update, the batch's features are not queued
    and the EMA does not move."""
    from vlp.models.base import OptimConfig

    model = tiny_albef(optim=OptimConfig(max_nonfinite_steps=1))
    itc = model.objectives["itc"]
    queue, ema, online = itc.image_queue.clone(), model.image_proj_m.weight.clone(), model.image_proj.weight.clone()
    bad = batch(0)
    bad["image"][:] = float("nan")
    _fit_on(model, [bad])
    assert model.nonfinite_steps == 1
    assert torch.equal(model.image_proj.weight, online)  # no update
    assert torch.equal(itc.image_queue, queue) and int(itc.queue_ptr) == 0
    assert torch.equal(model.image_proj_m.weight, ema)
