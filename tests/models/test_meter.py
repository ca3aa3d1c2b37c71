"""METER: both fusions' shapes and gradients, the match features by hand, MLM/ITM/ITC
from the shared objectives, parameter-group learning rates, pretraining evaluation."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_bert

from vlp.blocks import CoAttentionFusion, MergedAttentionFusion
from vlp.encoders import TimmVisionEncoder
from vlp.errors import ConfigError
from vlp.models import METER, OptimConfig
from vlp.objectives import ITC, ITM, MIM, MLM, NLVR2, VE, VQA, MomentumITC

V, Dv, Dt, D, B, L = 50, 24, 40, 32, 4, 7


def tiny_meter(fusion: str = "co", objectives=None, **kwargs) -> METER:
    torch.manual_seed(0)
    image = TimmVisionEncoder(
        "vit_tiny_patch16_224",
        img_size=32,
        pool="cls",
        model_kwargs=dict(patch_size=16, embed_dim=Dv, depth=1, num_heads=2),
    )
    text = tiny_bert(V, Dt)
    cls = CoAttentionFusion if fusion == "co" else MergedAttentionFusion
    fuse = cls(D, 1, 2, mlp_ratio=2.0)
    if objectives is None:
        objectives = [MLM(dim=D, vocab_size=V, distill=False, tie_weights=False), ITM(dim=2 * D, hard_negatives=False)]
    return METER(image, text, fuse, objectives, hidden_size=D, embed_dim=16, **kwargs)


def batch(seed: int = 0, modality: str = "pair") -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 5:] = 0
    labels = torch.full((B, L), -100)
    labels[:, 2] = ids[:, 2]
    mlm_ids = ids.clone()
    mlm_ids[:, 2] = 3
    return {
        "modality": modality,
        "image": torch.randn(B, 3, 32, 32, generator=g),
        "text_ids": ids,
        "text_mask": mask,
        "image_id": torch.arange(B),
        "text_image_id": torch.arange(B),
        "mlm_input_ids": mlm_ids,
        "mlm_labels": labels,
    }


def step_reaches_every_parameter(model, b: dict) -> torch.Tensor:
    """One training step on ``b``: the loss is finite and every parameter gets a non-zero
    gradient. → the loss."""
    model.train()
    loss = model.training_step(b, 0)
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing
    return loss


@pytest.mark.parametrize("fusion", ["co", "merged"])
def test_every_parameter_gets_a_gradient(fusion):
    model = tiny_meter(
        fusion,
        objectives=[
            MLM(dim=D, vocab_size=V, distill=False, tie_weights=False),
            ITM(dim=2 * D, hard_negatives=True),
            ITC(),
        ],
    )
    step_reaches_every_parameter(model, batch())


@pytest.mark.parametrize("fusion", ["co", "merged"])
def test_shapes_and_masked_text(fusion):
    model = tiny_meter(fusion).eval()
    b = batch()
    out = model(b)
    assert out.image_tokens.shape == (B, 1 + 4, D) and out.text_tokens.shape == (B, L, D)
    assert out.fused_cls.shape == (B, 2 * D)
    assert model.mlm_hidden(b["mlm_input_ids"], b["text_mask"], out.image_tokens).shape == (B, L, D)
    # padding never leaks: changing ids behind the mask changes nothing
    ids = b["text_ids"].clone()
    ids[1, 5:] = 7
    torch.testing.assert_close(
        model.match_features(model.embed_text(ids, b["text_mask"])[0], b["text_mask"], out.image_tokens)[1],
        out.fused_cls[1],
    )


def test_match_features_by_hand():
    """Type embeddings on the projected tokens, fusion, poolers = tanh(dense(first token)), concat."""
    model = tiny_meter("co").eval()
    b = batch()
    with torch.no_grad():
        img = model.image_encoder(b["image"]).tokens @ model.image_proj.weight.T + model.image_proj.bias
        img = img + model.token_type.weight[1]
        txt = model.text_encoder(b["text_ids"], b["text_mask"]).tokens @ model.text_proj.weight.T + model.text_proj.bias
        txt = txt + model.token_type.weight[0]
        fused = model.fusion(txt, img, text_mask=b["text_mask"].bool())
        t = torch.tanh(fused.text_tokens[:, 0] @ model.text_pooler.dense.weight.T + model.text_pooler.dense.bias)
        v = torch.tanh(fused.image_tokens[:, 0] @ model.image_pooler.dense.weight.T + model.image_pooler.dense.bias)
        torch.testing.assert_close(model(b).fused_cls, torch.cat([t, v], dim=-1))


def test_mlm_head_untied_or_tied():
    untied = tiny_meter().objectives["mlm"]
    assert untied.head.decoder.shape == (V, D) and untied.head_m is None
    # tying needs the fused width to equal the word-embedding width
    with pytest.raises(ConfigError, match="tie_weights: false"):
        tiny_meter(objectives=[MLM(dim=D, vocab_size=V, distill=False)])


def test_objectives_that_need_a_momentum_model_are_refused():
    with pytest.raises(ConfigError, match="METER has no momentum model"):
        tiny_meter(objectives=[MomentumITC(queue_size=8, embed_dim=16)])
    with pytest.raises(ConfigError, match="METER has no momentum model"):
        tiny_meter(objectives=[MLM(dim=D, vocab_size=V, tie_weights=False)])  # distill: true


def test_learning_rates_per_part():
    """The paper's Table 6 setting: 5x for the newly initialised top."""
    top = ["fusion", "image_proj", "text_proj", "token_type", "text_pooler", "image_pooler", "objectives"]
    model = tiny_meter(optim=OptimConfig(lr=1e-5, lr_mult={k: 5.0 for k in top}))
    lrs = {n: g["lr"] for g in model.param_groups() for n in g["names"]}
    assert lrs and all(lr == pytest.approx(5e-5) for n, lr in lrs.items() if n.split(".")[0] in top)
    assert all(lr == pytest.approx(1e-5) for n, lr in lrs.items() if n.split(".")[0] not in top)
    assert {n.split(".")[0] for n, lr in lrs.items() if lr == pytest.approx(1e-5)} == {"image_encoder", "text_encoder"}
    # freezing the bottom layers of a tower is a recipe pattern too
    frozen = tiny_meter(optim=OptimConfig(freeze=["image_encoder.*"]))
    names = {n for g in frozen.param_groups() for n in g["names"]}
    assert names and not any(n.startswith("image_encoder.") for n in names)


def test_pretraining_evaluation_reports_itm_and_mlm_accuracy():
    model = tiny_meter().eval()
    b = batch(modality="retrieval")
    # two captions per image in a retrieval batch: text_image_id maps captions to images
    b["text_image_id"] = torch.tensor([0, 0, 1, 3])
    model._evaluators["val"] = []
    model._eval_batch("val", b, 0)
    model._eval_batch("val", batch(1), 0)
    stats = model._evaluators["val"][0].stats
    assert stats["itm_True_n"] == 2 * B and stats["itm_False_n"] == 2 * B and stats["mlm_n"] == 2 * B
    model._finish_evaluation("val")
    scores = model.results["val"]["scores"]
    assert set(scores) == {"itm_acc", "mlm_acc"} and 0 <= scores["itm_acc"] <= 100


def task_batches() -> dict[str, dict]:
    """One small batch per task modality (vqa, ve, nlvr2) at the tiny models' sizes."""
    g = torch.Generator().manual_seed(0)
    common = {
        "image": torch.randn(B, 3, 32, 32, generator=g),
        "image_id": torch.arange(B),
        "text_ids": torch.randint(5, V, (B, L), generator=g),
        "text_mask": torch.ones(B, L, dtype=torch.long),
    }
    return {
        "vqa": {
            **common,
            "modality": "vqa",
            "answers": [["yes"], ["no"], ["red"], ["blue"]],
            "question_type": ["a"] * B,
        },
        "ve": {**common, "modality": "ve", "label": torch.tensor([0, 1, 2, 1])},
        "nlvr2": {
            **common,
            "modality": "nlvr2",
            "image2": torch.randn(B, 3, 32, 32, generator=g),
            "label": torch.tensor([0, 1, 1, 0]),
        },
    }


def test_meter_fine_tunes_and_evaluates_vqa_and_ve():
    model = tiny_meter(objectives=[VQA(dim=2 * D, answers=["yes", "no", "red"]), VE(dim=2 * D)])
    vqa, ve = task_batches()["vqa"], task_batches()["ve"]
    model.train()
    for b, objective in ((vqa, "vqa"), (ve, "ve")):
        model.zero_grad()
        loss = model.training_step(b, 0)
        loss.backward()
        head = model.objectives[objective]
        assert all(p.grad is not None for p in head.parameters())
        assert model.fusion.text_layers[0].attn.qkv.weight.grad is not None
        other = next(o for n, o in model.objectives.items() if n != objective)
        assert all(p.grad is None for p in other.parameters())  # a batch trains its own head only
    model.eval()
    model._eval_batch("val", vqa, 0)
    model._eval_batch("test", ve, 0)
    model.on_validation_epoch_end()
    model.on_test_epoch_end()
    assert model.results["val"]["task"] == "vqa" and set(model.results["val"]["scores"]) == {"overall", "other"}
    assert model.results["test"]["task"] == "ve" and set(model.results["test"]["scores"]) == {"acc"}
    with pytest.raises(ConfigError, match="no val evaluation for 'nlvr2'"):
        model._eval_batch("val", {**vqa, "modality": "nlvr2"}, 0)


def test_nlvr2_fuses_the_sentence_with_each_image():
    model = tiny_meter(objectives=[NLVR2(dim=2 * D)], num_token_types=3)
    g = torch.Generator().manual_seed(0)
    b = {
        "modality": "nlvr2",
        "image": torch.randn(B, 3, 32, 32, generator=g),
        "image2": torch.randn(B, 3, 32, 32, generator=g),
        "image_id": torch.arange(B),
        "text_ids": torch.randint(5, V, (B, L), generator=g),
        "text_mask": torch.ones(B, L, dtype=torch.long),
        "label": torch.tensor([0, 1, 1, 0]),
    }
    model.train()
    loss = model.training_step(b, 0)
    loss.backward()
    assert model.token_type.weight.grad[2].abs().sum() > 0  # the right image's own type
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    model.eval()
    head = model.objectives["nlvr2"]
    with torch.no_grad():
        out = model(b)
        right, _ = model.embed_image(b["image2"], token_type=2)
        want = torch.cat([out.fused_cls, model.match_features(out.text_tokens, out.text_mask, right)], -1)
        torch.testing.assert_close(head.features(out, b, model), want)
        # swapping the images changes the features (the pair is ordered)
        swapped = {**b, "image": b["image2"], "image2": b["image"]}
        assert not torch.allclose(head.features(model(swapped), swapped, model), want)
    model._eval_batch("test", b, 0)
    model.on_test_epoch_end()
    assert model.results["test"]["task"] == "nlvr2" and 0 <= model.results["test"]["scores"]["acc"] <= 100


def test_init_from_a_two_type_checkpoint_adds_the_third_type(tmp_path):
    pre = tiny_meter()
    torch.save({"state_dict": pre.state_dict()}, tmp_path / "pre.ckpt")
    model = tiny_meter(objectives=[NLVR2(dim=2 * D)], num_token_types=3)
    model.load_init_from(str(tmp_path / "pre.ckpt"))
    w = model.token_type.weight.detach()
    torch.testing.assert_close(w[:2], pre.token_type.weight.detach())
    torch.testing.assert_close(w[2], w[1])
    torch.testing.assert_close(model.fusion.text_layers[0].attn.qkv.weight, pre.fusion.text_layers[0].attn.qkv.weight)


def test_mim_regresses_masked_patches_through_the_fusion():
    model = tiny_meter(
        objectives=[
            MLM(dim=D, vocab_size=V, distill=False, tie_weights=False),
            ITM(dim=2 * D, hard_negatives=False),
            MIM(dim=D, encoder_dim=Dv, patch_size=16),
        ]
    )
    b = batch()
    mask = torch.zeros(B, 4, dtype=torch.bool)  # 32 px, 16 px patches: 2x2
    mask[:, 0] = True
    mask[1, 3] = True
    b["image_mask"] = mask
    step_reaches_every_parameter(model, b)
    # the loss by hand: per-patch normalised pixels of the masked patches
    mim = model.objectives["mim"]
    model.eval()
    with torch.no_grad():
        out = model(b)
        tokens, _ = model.embed_image(b["image"], patch_mask=mask, mask_token=mim.mask_token)
        fused = model.fusion(out.text_tokens, tokens, text_mask=out.text_mask).image_tokens[:, 1:]  # (B, 4, D)
        patches = b["image"].unfold(2, 16, 16).unfold(3, 16, 16)  # (B, 3, 2, 2, 16, 16)
        target = patches.permute(0, 2, 3, 4, 5, 1).reshape(B, 4, 16 * 16 * 3)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        error = (mim.head(fused) - target).pow(2).mean(-1)
        torch.testing.assert_close(mim(out, b, model)["mim_loss"], error[mask].mean())


def test_meter_on_a_swin_tower_pools_its_average_token():
    """METER's Swin setting: the average of the Swin tokens is prepended and pooled."""
    torch.manual_seed(0)
    swin = TimmVisionEncoder(
        "swin_tiny_patch4_window7_224",
        img_size=32,
        pool="avg",
        prepend_pooled=True,
        model_kwargs=dict(patch_size=4, window_size=4, embed_dim=12, depths=(1, 1), num_heads=(1, 2)),
    )
    ref = tiny_meter()
    model = METER(swin, ref.text_encoder, ref.fusion, ref.objectives, hidden_size=D)
    b = batch()
    model.train()
    loss = model.training_step(b, 0)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    with torch.no_grad():
        tokens, pooled = model.embed_image(b["image"])
        assert tokens.shape == (B, 1 + 16, D)  # 4x4 Swin tokens after one merge, plus the average
        torch.testing.assert_close(tokens[:, 0], model.image_proj(pooled) + model.token_type.weight[1])
